"""The ``llmstream`` command: stream a chat completion to the terminal.

llmstream chat "Explain PagedAttention in one sentence."
llmstream chat --fake "Hello"            # against the built-in vLLM emulator
llmstream models
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

import httpx

from ._client import Client
from ._errors import LLMStreamError, StreamInterrupted
from ._result import StreamResult
from ._version import __version__

__all__ = ["main"]

_FAKE_ANSWER = (
    "This answer comes from llmstream's built-in vLLM emulator, streamed token by token "
    "exactly as a vLLM server sends it. You asked: {prompt} Point --base-url (or "
    "LLMSTREAM_BASE_URL) at a vLLM server for a real answer."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmstream",
        description="Stream chat completions from vLLM or any OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"llmstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="stream the answer to a prompt")
    chat.add_argument("prompt", help="the prompt to send as the user message")
    _server_options(chat)
    chat.add_argument("--model", help="model id (default: $LLMSTREAM_MODEL, else the first served)")
    chat.add_argument("--system", help="a system message to send before the prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="default: 512")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument(
        "--fake-token-delay",
        type=float,
        default=0.02,
        help="seconds between the emulator's tokens (default: 0.02)",
    )
    chat.add_argument("--no-metrics", action="store_true", help="skip the closing metrics line")

    models = commands.add_parser("models", help="list the models the server serves")
    _server_options(models)
    return parser


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        help="server URL ending in /v1 (default: $LLMSTREAM_BASE_URL, $OPENAI_BASE_URL, "
        "then http://localhost:8000/v1); the API key comes from $LLMSTREAM_API_KEY "
        "or $OPENAI_API_KEY",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per network phase")
    parser.add_argument(
        "--fake",
        action="store_true",
        help="use the built-in vLLM emulator instead of a server",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example::

        main(["chat", "--fake", "Hello"])  # prints a streamed answer, returns 0
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _models(args)
        return _chat(args, sys.stdout, sys.stderr)
    except LLMStreamError as exc:
        print(f"\nllmstream: error: {_for_terminal(exc)}", file=sys.stderr)
        return 1


def _models(args: argparse.Namespace) -> int:
    transport = None
    if args.fake:
        from .testing import FakeVLLM

        transport = FakeVLLM().transport()
    with Client(_base_url(args), timeout=args.timeout, transport=transport) as client:
        for model in client.models():
            print(model)
    return 0


def _chat(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    messages: list[dict[str, object]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})

    transport: httpx.BaseTransport | None = None
    base_url = _base_url(args)
    if args.fake:
        from .testing import FakeVLLM  # only the emulator's users pay for importing it

        fake = FakeVLLM(
            _FAKE_ANSWER.format(prompt=args.prompt), token_delay=max(args.fake_token_delay, 0.0)
        )
        transport = fake.transport()
        print("[llmstream emulator: a fake vLLM server, not a model]", file=err, flush=True)

    with Client(base_url, model=args.model, timeout=args.timeout, transport=transport) as client:
        stream = client.stream(messages, max_tokens=args.max_tokens, temperature=args.temperature)
        try:
            with stream:
                for text in stream:
                    out.write(text)
                    out.flush()
        except KeyboardInterrupt:
            # Leaving the with block closed the connection: the server aborts the request.
            out.write("\n")
            if not args.no_metrics:
                print(_metrics_line(stream.result, "stopped"), file=err)
            return 130
        except StreamInterrupted as exc:
            out.write("\n")
            print(_metrics_line(exc.partial, "interrupted"), file=err)
            raise
    out.write("\n")
    if not args.no_metrics:
        print(_metrics_line(stream.result, stream.result.finish_reason or "?"), file=err)
    return 0


def _base_url(args: argparse.Namespace) -> str | None:
    # The emulator answers in process; the URL only names it.
    return "http://fake-vllm.invalid/v1" if args.fake else args.base_url


def _for_terminal(exc: LLMStreamError) -> str:
    # Messages address programmers (exc.partial...); a terminal user needs the rest.
    sentences = str(exc).split(". ")
    return ". ".join(s for s in sentences if "exc.partial" not in s).rstrip(".") + "."


def _metrics_line(result: StreamResult, ending: str) -> str:
    m = result.metrics
    ttft = f"{m.time_to_first_token:.3f}s" if m.time_to_first_token is not None else "-"
    tps = f"{m.tokens_per_second:.1f}" if m.tokens_per_second is not None else "-"
    return (
        f"[TTFT {ttft} | {tps} tokens/s | {m.completion_tokens} tokens | "
        f"{m.duration:.2f}s | {ending}]"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
