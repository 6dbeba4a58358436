"""The ``llmstream`` command: stream chat completions to the terminal.

llmstream chat "Explain PagedAttention in one sentence."
echo "Summarise this." | llmstream chat -m Qwen/Qwen3-8B
llmstream chat -i                        # a conversation, one turn per line
llmstream chat --fake "Hello"            # against the built-in vLLM emulator
llmstream models
llmstream bench --fake --num-prompts 20  # a load test (docs/load-testing.md)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import _bench
from ._argtypes import at_least, non_negative, positive_seconds, seconds
from ._client import Client
from ._ctrl_c import CtrlCWatch
from ._errors import LLMStreamError, StreamInterrupted
from ._result import StreamResult
from ._version import __version__

if TYPE_CHECKING:
    from ._sync_stream import ChatStream
    from .testing import FakeVLLM

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 130  # 128 + SIGINT, as shells report a command stopped with Ctrl-C

_FAKE_ANSWER = (
    "This answer comes from llmstream's built-in vLLM emulator, streamed token by token "
    "exactly as a vLLM server sends it. You asked: {prompt} Point --base-url (or "
    "LLMSTREAM_BASE_URL) at a vLLM server for a real answer."
)
_FAKE_BASE_URL = "http://fake-vllm.invalid/v1"  # the emulator answers in process
_QUIT = ("exit", "quit")

# Request parameters that have a flag of their own, and those the command sets itself.
_PARAMETER_FLAGS = {
    "model": "--model (-m)",
    "max_tokens": "--max-tokens (-t)",
    "temperature": "--temperature",
}
_SET_BY_CHAT = ("messages", "stream")

# The library's messages name its Python arguments; a terminal user has flags instead.
# ("parameter=max_tokens" is the server naming the body field: left as it is.)
_CLI_SPELLINGS = (
    (re.compile(r"\bapi_key=\.\.\."), "--api-key"),
    (re.compile(r"\bmodel=\.\.\."), "--model"),
    (re.compile(r"(?<!parameter=)\bmax_tokens=(?=\d)"), "--max-tokens "),
    (re.compile(r"(?<!parameter=)\bmax_tokens\b"), "--max-tokens"),
    (re.compile(r"\bTimeouts\.\w+"), "--timeout"),
    (re.compile(r"\b(?:connect|first_token|idle|total)=(?=\d)"), ""),
)


class _UsageError(Exception):
    """The command line cannot run as given (exit status 2); nothing was sent."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmstream",
        description="Stream chat completions from vLLM or any OpenAI-compatible server.",
        epilog="Exit status: 0 done, 1 an error, 2 a bad command line, 130 stopped (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"llmstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser(
        "chat",
        help="stream the answer to a prompt, or hold a conversation",
        description="Stream the answer to PROMPT; without one, read it from standard "
        "input, or hold a conversation when standard input is a terminal.",
    )
    chat.add_argument(
        "prompt",
        nargs="?",
        metavar="PROMPT",
        help="the user message; '-' or none: read it from standard input",
    )
    chat.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="hold a conversation: one message per line, each answer kept as context",
    )
    chat.add_argument(
        "-s", "--system", metavar="TEXT", help="a system message sent before the conversation"
    )
    chat.add_argument(
        "-m",
        "--model",
        metavar="ID",
        help="model id (default: $LLMSTREAM_MODEL, else the first the server lists)",
    )
    chat.add_argument(
        "-t",
        "--max-tokens",
        type=at_least(1),
        default=512,
        metavar="N",
        help="the most tokens to generate (default: 512)",
    )
    chat.add_argument(
        "--temperature",
        type=non_negative,
        metavar="T",
        help="sampling temperature (default: the server's)",
    )
    chat.add_argument(
        "-o",
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an extra request parameter (repeatable); VALUE is read as JSON when it "
        'parses (0.9, true, ["a"]), else as text: -o top_p=0.9 -o seed=7',
    )
    chat.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the whole result at the end, instead of the "
        "text as it arrives and the metrics line",
    )
    chat.add_argument("--no-metrics", action="store_true", help="skip the closing metrics line")
    chat.add_argument(
        "--reasoning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a reasoning model's thinking as it streams, dimmed, before the answer "
        "(default: on a terminal; --reasoning when piped writes it to standard error)",
    )
    _server_options(chat)
    chat.add_argument(
        "--fake-token-delay",
        type=seconds,
        default=0.02,
        metavar="SECONDS",
        help="with --fake: seconds between the emulator's tokens (default: 0.02)",
    )
    chat.add_argument(
        "--fake-ttft",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="with --fake: seconds before the emulator's first token (default: 0)",
    )

    models = commands.add_parser(
        "models",
        help="list the models the server serves",
        description="List the ids of the models the server serves (GET /v1/models).",
    )
    _server_options(models)

    bench = commands.add_parser(
        "bench",
        help="load-test a server: latency and throughput under load, as vllm bench serve",
        description="Send --num-prompts streamed requests at a fixed concurrency or request "
        "rate and report TTFT, TPOT, ITL and end-to-end latency (vLLM's definitions), "
        "throughput and goodput.",
    )
    _server_options(bench)
    _bench.add_arguments(bench)
    return parser


def _server_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--base-url",
        metavar="URL",
        help="server URL ending in /v1 (default: $LLMSTREAM_BASE_URL, $OPENAI_BASE_URL, "
        "then http://localhost:8000/v1)",
    )
    where.add_argument(
        "--fake",
        action="store_true",
        help="answer from the built-in vLLM emulator instead of a server",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key (default: $LLMSTREAM_API_KEY, then $OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="the connect, first-token and idle deadlines (default: 10, 300 and 60 s)",
    )


def _option(text: str) -> tuple[str, object]:
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    except RecursionError:
        raise argparse.ArgumentTypeError(f"the JSON value of {key} is nested too deeply") from None
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1, 2 or 130).

    Example::

        main(["chat", "--fake", "Hello"])  # prints a streamed answer, returns 0
    """
    term = _Terminal(sys.stdin, sys.stdout, sys.stderr)
    try:
        return _run(argv, term)
    except KeyboardInterrupt:
        # Before a stream started (or after it ended): there is nothing to report but this.
        term.note("[stopped]", newline_first=True)
        return EXIT_STOPPED
    except BrokenPipeError:
        # What reads the output went away (`| head`): the stream was closed on the way out,
        # and there is no one left to tell. Python would complain again at exit, flushing
        # standard output into the closed pipe, so it is pointed at /dev/null.
        _silence_stdout()
        return EXIT_FAILED


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # standard output is not a file here (replaced, in tests)
        pass


def _run(argv: Sequence[str] | None, term: _Terminal) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "models":
            return _models(args, term)
        if args.command == "bench":
            return _bench.run(args, term.out, term.err)
        return _chat(args, term)
    except _UsageError as exc:
        print(f"llmstream {args.command}: error: {exc}", file=term.err)
        return EXIT_USAGE
    except LLMStreamError as exc:
        term.error(exc)
        return EXIT_FAILED


@dataclasses.dataclass
class _Terminal:
    """The command's standard streams; standard error takes colour on a terminal only."""

    stdin: TextIO
    out: TextIO
    err: TextIO

    @property
    def colour(self) -> bool:
        # https://no-color.org: any non-empty NO_COLOR turns colour off.
        if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
            return False
        isatty = getattr(self.err, "isatty", None)
        return bool(isatty and isatty())

    @property
    def out_is_terminal(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())

    def thinking(self, text: str) -> None:
        """A piece of the model's reasoning: dimmed inline on a terminal, else on stderr."""
        if self.out_is_terminal:
            coloured = not (os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb")
            self.out.write(f"\x1b[2m{text}\x1b[0m" if coloured else text)
            self.out.flush()
        else:
            self.err.write(text)
            self.err.flush()

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def note(self, text: str, *, newline_first: bool = False) -> None:
        """A line for the user on standard error (dimmed on a terminal)."""
        self.err.write(("\n" if newline_first else "") + self._paint(text, "2") + "\n")
        self.err.flush()

    def error(self, exc: LLMStreamError) -> None:
        """The error as one line on standard error, prefixed ``llmstream: error:``."""
        prefix = self._paint("llmstream: error:", "1;31")
        self.err.write(f"{prefix} {_for_terminal(exc)}\n")
        self.err.flush()


def _models(args: argparse.Namespace, term: _Terminal) -> int:
    fake = None
    if args.fake:
        from .testing import FakeVLLM

        fake = FakeVLLM()
    with _client(args, fake) as client:
        for model in client.models():
            print(model, file=term.out)
    return EXIT_OK


def _chat(args: argparse.Namespace, term: _Terminal) -> int:
    extra = _extra_parameters(args.option)
    prompt = _first_prompt(args, term.stdin)
    fake = _emulator(args, term) if args.fake else None
    with _client(args, fake) as client, CtrlCWatch() as ctrl_c:
        chat = _Conversation(client, args, term, fake, extra, ctrl_c)
        if prompt is not None and not args.interactive:
            return chat.turn(prompt)
        return _converse(chat, term, prompt)


def _first_prompt(args: argparse.Namespace, stdin: TextIO) -> str | None:
    """The prompt to send first, or None to read turns from standard input."""
    prompt: str | None = args.prompt
    if prompt is None and (args.interactive or stdin.isatty()):
        return None
    if prompt is None or prompt == "-":
        prompt = _text(stdin.read).rstrip("\n")
        if not prompt.strip():
            raise _UsageError("standard input held no prompt: nothing was sent")
    if not prompt.strip():
        raise _UsageError("the prompt is empty: nothing was sent")
    return prompt


def _extra_parameters(options: list[tuple[str, object]]) -> dict[str, object]:
    extra: dict[str, object] = {}
    for key, value in options:
        if key in _PARAMETER_FLAGS:
            raise _UsageError(f"-o {key}=...: use {_PARAMETER_FLAGS[key]} instead")
        if key in _SET_BY_CHAT:
            raise _UsageError(f"-o {key}=...: llmstream chat sets {key} itself")
        extra[key] = value
    return extra


def _emulator(args: argparse.Namespace, term: _Terminal) -> FakeVLLM:
    from .testing import FakeVLLM  # only the emulator's users pay for importing it

    term.note("[llmstream emulator: a fake vLLM server, not a model]")
    return FakeVLLM(ttft=args.fake_ttft, token_delay=args.fake_token_delay)


def _client(args: argparse.Namespace, fake: FakeVLLM | None) -> Client:
    transport = fake.transport() if fake is not None else None
    return Client(
        _FAKE_BASE_URL if fake is not None else args.base_url,
        model=getattr(args, "model", None),  # `models` has no --model
        api_key=args.api_key,
        timeout=args.timeout,
        transport=transport,
    )


class _Conversation:
    """The messages so far, and one streamed turn at a time."""

    def __init__(
        self,
        client: Client,
        args: argparse.Namespace,
        term: _Terminal,
        fake: FakeVLLM | None,
        extra: dict[str, object],
        ctrl_c: CtrlCWatch | None = None,
    ) -> None:
        self._client = client
        self._ctrl_c = ctrl_c if ctrl_c is not None else CtrlCWatch()
        self._args = args
        self._term = term
        self._fake = fake
        self._params = _stream_parameters(args, extra)
        self.messages: list[dict[str, object]] = []
        if args.system:
            self.messages.append({"role": "system", "content": args.system})

    def turn(self, prompt: str) -> int:
        """Send ``prompt`` with the conversation so far and stream the answer.

        The answer joins the conversation (a stopped one too, as far as it was read);
        a failed turn leaves the conversation as it was.
        """
        if self._fake is not None:
            answer = _FAKE_ANSWER.format(prompt=prompt)
            self._fake.config = dataclasses.replace(self._fake.config, text=answer)
        self.messages.append({"role": "user", "content": prompt})
        answer, status = self._stream()
        if answer and status != EXIT_FAILED:
            self.messages.append({"role": "assistant", "content": answer})
        else:
            self.messages.pop()
        return status

    def _stream(self) -> tuple[str, int]:
        """Stream one answer; returns the text read (what was shown) and the exit status."""
        term, args = self._term, self._args
        read: list[str] = []
        started = time.perf_counter()  # the wall time: model lookup and retries included
        stream = self._client.stream(list(self.messages), **self._params)
        # Ctrl-C reaches it even when the signal comes just before a blocking read.
        self._ctrl_c.current = stream
        try:
            show_reasoning = not args.json and (
                args.reasoning if args.reasoning is not None else term.out_is_terminal
            )
            thinking = False
            with stream:
                for event in stream.events():
                    if event.choice != 0:
                        continue
                    if event.type == "reasoning":
                        if show_reasoning:
                            term.thinking(event.text)
                            thinking = True
                    elif event.type == "text":
                        if thinking:  # the thinking is over: the answer starts apart from it
                            term.thinking("\n\n")
                            thinking = False
                        read.append(event.text)
                        if not args.json:
                            term.out.write(event.text)
                            term.out.flush()
        except KeyboardInterrupt:
            self._ctrl_c.current = None
            # Stopped while opening too: the with block then did not close it.
            stream.close()
            result = _result_of(stream)
            self._report(result, started, "stopped", always=True)
            return "".join(read), EXIT_STOPPED
        except LLMStreamError as exc:
            if isinstance(exc, StreamInterrupted):
                self._report(exc.partial, started, "interrupted")
            elif args.json and exc.partial is not None:
                term.out.write(exc.partial.model_dump_json() + "\n")
            term.error(exc)
            return "".join(read), EXIT_FAILED
        finally:
            self._ctrl_c.current = None
        result = stream.result
        self._report(result, started, result.finish_reason or result.status)
        return "".join(read), EXIT_OK

    def _report(
        self, result: StreamResult | None, started: float, ending: str, *, always: bool = False
    ) -> None:
        """End the answer: a newline after the text, or the JSON; then the metrics line."""
        term, args = self._term, self._args
        if args.json:
            if result is not None:
                term.out.write(result.model_dump_json() + "\n")
        else:
            term.out.write("\n")
        term.out.flush()
        if not (args.no_metrics or args.json):
            term.note(_metrics_line(result, time.perf_counter() - started, ending))
        elif always:
            term.note(f"[{ending}]")


def _stream_parameters(args: argparse.Namespace, extra: dict[str, object]) -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if extra:
        params["extra_body"] = extra  # merged into the request body, as openai's is
    return params


def _result_of(stream: ChatStream) -> StreamResult | None:
    try:
        return stream.result
    except LLMStreamError:  # stopped before the stream had a result to give
        return None


def _converse(chat: _Conversation, term: _Terminal, first: str | None) -> int:
    """Hold the conversation; 1 if a turn failed, else 0 (Ctrl-C stops one answer)."""
    tty = term.stdin.isatty()
    if tty:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        term.note("[Ctrl-C stops an answer; 'exit' or Ctrl-D ends the conversation]")
    status = EXIT_OK
    prompt = first
    while True:
        if prompt is None:
            try:
                prompt = _read_turn(term, tty)
            except KeyboardInterrupt:
                if not tty:
                    raise
                term.out.write("\n")  # a fresh prompt, as a shell gives
                continue
            if prompt is None or prompt.strip() in _QUIT:
                return status
        if prompt.strip() and chat.turn(prompt) == EXIT_FAILED:
            status = EXIT_FAILED
        prompt = None


def _read_turn(term: _Terminal, tty: bool) -> str | None:
    if tty:
        try:
            return input("> ")
        except EOFError:
            term.out.write("\n")
            return None
    line = _text(term.stdin.readline)
    return line.rstrip("\n") if line else None


def _text(read: Callable[[], str]) -> str:
    """What ``read`` reads from standard input, which must be UTF-8 text."""
    try:
        text = read()
        # Under a C locale, Python decodes bytes that are not UTF-8 to lone surrogates.
        text.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise _UsageError(
            "standard input is not UTF-8 text; convert it first (iconv -t UTF-8)"
        ) from None
    return text


def _for_terminal(exc: LLMStreamError) -> str:
    # Messages address programmers (exc.partial, max_tokens=...); a terminal user has flags.
    sentences = [_without_partial(s) for s in str(exc).split(". ")]
    text = ". ".join(s for s in sentences if s).rstrip(".")
    text += "" if text.endswith(("?", "!")) else "."
    for pattern, flag in _CLI_SPELLINGS:
        text = pattern.sub(flag, text)
    return text


def _without_partial(sentence: str) -> str:
    # "exc.partial holds what arrived; retry the request..." -> "Retry the request..."
    if "exc.partial" not in sentence:
        return sentence
    advice = sentence.partition("; ")[2]
    return advice[:1].upper() + advice[1:]


def _metrics_line(result: StreamResult | None, seconds: float, ending: str) -> str:
    m = result.metrics if result is not None else None
    ttft = "-"
    tps = "-"
    tokens = 0
    if m is not None:
        ttft = f"{m.time_to_first_token:.3f}s" if m.time_to_first_token is not None else "-"
        tps = f"{m.tokens_per_second:.1f}" if m.tokens_per_second is not None else "-"
        tokens = m.completion_tokens
    return f"[TTFT {ttft} | {tps} tokens/s | {tokens} tokens | {seconds:.2f}s | {ending}]"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
