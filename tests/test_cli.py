"""The ``llmstream`` command, run as a user runs it."""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import llmstream
from llmstream import _cli
from llmstream._cli import main
from llmstream.testing import FakeVLLM, Fault

from .processes import as_at_a_terminal

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
FAST = ["--fake", "--fake-token-delay", "0"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "OPENAI_"))}
    env.pop("NO_COLOR", None)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmstream", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )


def _start(*argv: str, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmstream", *argv],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Its threads' stacks on SIGABRT: what a command that did not stop was doing.
        env=_env(PYTHONFAULTHANDLER="1"),
        text=True,
        preexec_fn=as_at_a_terminal(),  # Ctrl-C works even if this run ignores SIGINT
    )


class _Stdin(io.StringIO):
    """Standard input with lines typed in advance, at a terminal or from a pipe."""

    def __init__(self, text: str, *, tty: bool) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class _TerminalOut(io.StringIO):
    def isatty(self) -> bool:
        return True


def _chat_bodies(fake: FakeVLLM) -> list[dict[str, object]]:
    return [r.json for r in fake.requests if r.path.endswith("/chat/completions")]  # type: ignore[misc]


def _duration(err: str) -> float:
    match = re.search(r"\| ([\d.]+)s \| \w+\]", err)
    assert match, err
    return float(match.group(1))


# -- answering -----------------------------------------------------------------------


def test_chat_fake_streams_and_prints_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", *FAST, "What is vLLM?"]) == 0
    out, err = capsys.readouterr()
    assert "You asked: What is vLLM?" in out
    assert "emulator" in err and "not a model" in err
    assert "TTFT" in err and "tokens/s" in err and "| stop]" in err


def test_chat_against_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeVLLM("Served answer.")
    with fake.serve() as server:
        code = main(["chat", "--base-url", server.base_url, "--max-tokens", "2", "Hi"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "Served answer\n"  # two tokens: "Served", " answer"
    assert "| length]" in err
    assert _chat_bodies(fake)[-1]["max_tokens"] == 2


def test_short_flags_set_the_system_message_model_and_max_tokens() -> None:
    fake = FakeVLLM("Fine.", model="org/m")
    with fake.serve() as server:
        argv = ["chat", "--base-url", server.base_url, "-s", "Be brief.", "-m", "org/m"]
        assert main([*argv, "-t", "7", "--temperature", "0.5", "Hi"]) == 0
    body = _chat_bodies(fake)[0]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("org/m", 7, 0.5)


def test_piped_standard_input_is_the_prompt() -> None:
    proc = _run("chat", *FAST, stdin="What is vLLM?\n")
    assert proc.returncode == 0, proc.stderr
    assert "You asked: What is vLLM? Point" in proc.stdout


def test_a_dash_reads_the_prompt_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM("Read.")
    monkeypatch.setattr(sys, "stdin", _Stdin("line one\nline two\n", tty=True))
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, "-"]) == 0
    assert _chat_bodies(fake)[0]["messages"] == [{"role": "user", "content": "line one\nline two"}]
    assert capsys.readouterr().out == "Read.\n"


@pytest.mark.parametrize(
    ("argv", "stdin"),
    [([""], ""), (["  \n "], ""), (["-"], ""), ([], "\n")],
    ids=["empty", "blank", "dash-empty-stdin", "empty-piped-stdin"],
)
def test_an_empty_prompt_is_a_usage_error_and_nothing_is_sent(
    argv: list[str],
    stdin: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeVLLM()
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin, tty=False))
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, *argv]) == 2
    assert fake.requests == []
    assert "nothing was sent" in capsys.readouterr().err


def test_json_prints_one_result_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", *FAST, "--json", "Hi"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1  # one object, on one line, and no streamed text before it
    result = llmstream.StreamResult.model_validate_json(out)
    assert result.text.startswith("This answer comes from") and "You asked: Hi" in result.text
    assert result.finish_reason == "stop" and result.status == "complete"
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.metrics.time_to_first_token is not None
    assert "TTFT" not in err  # the metrics are in the object


def test_options_are_json_when_they_parse_else_text() -> None:
    fake = FakeVLLM("Ok.")
    with fake.serve() as server:
        argv = ["chat", "--base-url", server.base_url, "-o", "top_p=0.5", "-o", 'stop=["\\n"]']
        argv += ["-o", "seed=7", "-o", "user=alice", "-o", "ignore_eos=true", "-o", "seed=8"]
        assert main([*argv, "Hi"]) == 0
    body = _chat_bodies(fake)[0]
    assert body["top_p"] == 0.5 and body["stop"] == ["\n"] and body["user"] == "alice"
    assert body["seed"] == 8 and body["ignore_eos"] is True  # the last -o for a key wins


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("top_p", "expected KEY=VALUE"),
        ("=1", "expected KEY=VALUE"),
        ("max_tokens=3", "use --max-tokens (-t) instead"),
        ("model=x", "use --model (-m) instead"),
        ("messages=[]", "sets messages itself"),
        ("x=" + "[" * 100_000, "the JSON value of x is nested too deeply"),
    ],
)
def test_bad_options_are_usage_errors(
    option: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM()
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, "-o", option, "Hi"]) == 2
    assert fake.requests == []
    assert message in capsys.readouterr().err


def test_api_key_flag_is_sent_and_a_wrong_one_names_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeVLLM("In.", api_key="sk-right")
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, "--api-key", "sk-right", "Hi"]) == 0
        assert main(["models", "--base-url", server.base_url, "--api-key", "sk-wrong"]) == 1
    assert fake.requests[0].headers["authorization"] == "Bearer sk-right"
    err = capsys.readouterr().err
    assert "--api-key" in err and "api_key=" not in err


def test_errors_name_flags_not_python_keywords(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeVLLM(max_model_len=1000, ttft=30).serve() as server:
        assert main(["chat", "--base-url", server.base_url, "-t", "5000", "Hi"]) == 1
        argv = ["chat", "--base-url", server.base_url, "--timeout", "0.1", "Hi"]
        assert main(argv) == 1  # no first token within 0.1 s, three times
    html = _Server(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\n\r\n<html>")
    assert main(["chat", "--base-url", html.base_url, "Hi"]) == 1  # no model list
    err = capsys.readouterr().err
    assert (
        "--max-tokens 5000" in err
        and "Raise --timeout" in err
        and "does not speak the OpenAI API" in err
    )
    for keyword in ("max_tokens=", "model=", "Timeouts.", "first_token="):
        assert keyword not in err


def test_the_metrics_duration_is_the_wall_time_with_retries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeVLLM("Late.", model="m")
    fake.add_fault(Fault.http_status(503, retry_after=0.6))
    with fake.serve() as server:
        started = time.perf_counter()
        assert main(["chat", "--base-url", server.base_url, "-m", "m", "Hi"]) == 0
        wall = time.perf_counter() - started
    assert len(_chat_bodies(fake)) == 2
    assert 0.6 <= _duration(capsys.readouterr().err) <= wall


# -- conversations -------------------------------------------------------------------


def test_interactive_mode_keeps_the_conversation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM("Sure.")
    monkeypatch.setattr(sys, "stdin", _Stdin("first\n\n  \nsecond\nexit\nnever sent\n", tty=False))
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, "-i", "-s", "Be kind."]) == 0
    bodies = _chat_bodies(fake)
    assert len(bodies) == 2  # blank lines are skipped; "exit" ends the conversation
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "second"},
    ]
    assert capsys.readouterr().out == "Sure.\nSure.\n"


def test_no_prompt_at_a_terminal_starts_a_conversation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM("Hello.")
    monkeypatch.setattr(sys, "stdin", _Stdin("hi\nagain\n", tty=True))  # then Ctrl-D
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("> Hello.\n> Hello.\n> ")
    assert "Ctrl-D" in err
    assert len(_chat_bodies(fake)) == 2


class _CtrlCFirst(_Stdin):
    """A terminal where the user presses Ctrl-C at the first prompt, then types on."""

    def __init__(self, text: str) -> None:
        super().__init__(text, tty=True)
        self._pressed = False

    def readline(self, size: int | None = -1) -> str:
        if not self._pressed:
            self._pressed = True
            raise KeyboardInterrupt
        return super().readline(size)


def test_ctrl_c_at_the_prompt_gives_a_fresh_prompt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM("Still here.")
    monkeypatch.setattr(sys, "stdin", _CtrlCFirst("hi\n"))
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url]) == 0
    assert capsys.readouterr().out.startswith("> \n> Still here.\n> ")
    assert len(_chat_bodies(fake)) == 1


def test_a_failed_turn_is_left_out_of_the_conversation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM("Ok.", model="m")
    fake.add_fault(Fault.http_status(400))
    monkeypatch.setattr(sys, "stdin", _Stdin("refused\naccepted\n", tty=False))
    with fake.serve() as server:
        assert main(["chat", "--base-url", server.base_url, "-m", "m", "-i"]) == 1
    assert _chat_bodies(fake)[1]["messages"] == [{"role": "user", "content": "accepted"}]
    err = capsys.readouterr().err
    assert "llmstream: error: POST " in err and "HTTP 400" in err


# -- the command line itself ---------------------------------------------------------


def test_models_lists_the_served_models(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeVLLM(model="org/model-a").serve() as server:
        assert main(["models", "--base-url", server.base_url]) == 0
    assert capsys.readouterr().out.strip() == "org/model-a"


def test_models_fake_lists_the_emulators_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--fake"]) == 0
    assert capsys.readouterr().out == "llmstream/fake-model\n"


def test_errors_are_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeVLLM().serve() as server:
        assert main(["chat", "--base-url", server.base_url, "--model", "nope", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "llmstream: error: POST " in err and "HTTP 404" in err and "nope" in err
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"llmstream {llmstream.__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--max-tokens", "0", "Hi"],
        ["chat", "--timeout", "-1", "Hi"],
        ["chat", "--timeout", "0", "Hi"],  # a deadline that could never be met
        ["chat", "--temperature", "nan", "Hi"],
        ["chat", "--temperature", "-0.5", "Hi"],
        ["chat", "--temperature", "inf", "Hi"],
        ["chat", "--fake", "--base-url", "http://localhost:8000/v1", "Hi"],
        ["chat", "Hi", "extra"],
        ["serve"],
        [],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: llmstream" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("terminal", "no_color", "coloured"),
    [(True, None, True), (True, "1", False), (False, None, False)],
    ids=["terminal", "terminal-NO_COLOR", "pipe"],
)
def test_colour_only_on_a_terminal_without_no_color(
    terminal: bool,
    no_color: str | None,
    coloured: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err: io.StringIO = _TerminalOut() if terminal else io.StringIO()
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("TERM", raising=False)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert main(["chat", *FAST, "-m", "nope", "Hi"]) == 1
    assert ("\x1b[" in err.getvalue()) is coloured
    assert "\x1b[" not in out.getvalue()


def _documented_options(section: str) -> set[str]:
    text = (ROOT / "docs" / "cli.md").read_text("utf-8")
    body = text.split(f"## `llmstream {section}`", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(--[a-z-]+)", body))


def _parser_options(command: str) -> set[str]:
    parser = _cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[command]._actions
    return {o for a in actions for o in a.option_strings if o.startswith("--")} - {"--help"}


@pytest.mark.parametrize("command", ["chat", "models"])
def test_docs_and_help_list_the_same_options(command: str) -> None:
    assert _documented_options(command) == _parser_options(command)


# -- Ctrl-C --------------------------------------------------------------------------


def _assert_stopped(proc: subprocess.Popen[str]) -> str:
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the stacks go to its standard error, then it ends
        _, err = proc.communicate(timeout=20)
        pytest.fail(f"the command did not stop on Ctrl-C; it was at:\n{err}")
    assert proc.returncode == 130, err
    assert "stopped" in err and "Traceback" not in err
    return err


def test_ctrl_c_stops_the_stream_and_closes_the_connection() -> None:
    fake = FakeVLLM("one two three four five six", token_delay=1.0)
    with fake.serve() as server:
        proc = _start("chat", "--base-url", server.base_url, "Hi")
        assert proc.stdout is not None
        assert proc.stdout.read(3) == "one"  # the first token arrived; the next is 1 s away
        sent_at = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        disconnect = fake.wait_for_disconnect(timeout=10)
        err = _assert_stopped(proc)
    assert disconnect.time - sent_at < 0.5
    assert "| stopped]" in err


def test_ctrl_c_mid_answer_from_the_emulator() -> None:
    proc = _start("chat", "--fake", "--fake-token-delay", "30", "Hi")
    assert proc.stdout is not None
    assert proc.stdout.read(4) == "This"  # the first token; the next is 30 s away
    proc.send_signal(signal.SIGINT)
    assert "| 1 tokens |" in _assert_stopped(proc)


def test_ctrl_c_before_the_emulators_first_token() -> None:
    proc = _start("chat", "--fake", "--fake-ttft", "30", "--no-metrics", "Hi")
    assert proc.stderr is not None
    assert "emulator" in proc.stderr.readline()  # printed before the request is sent
    proc.send_signal(signal.SIGINT)
    assert "[stopped]" in _assert_stopped(proc)


def test_ctrl_c_in_a_conversation_stops_one_answer_and_the_conversation_goes_on() -> None:
    fake = FakeVLLM("one two", model="m")
    fake.add_fault(Fault.stall(after_chunks=2))  # the role chunk and "one", then nothing
    with fake.serve() as server:
        proc = _start("chat", "--base-url", server.base_url, "-m", "m", "-i", stdin=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("first\n")
        proc.stdin.flush()
        assert proc.stdout.read(3) == "one"
        sent_at = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        disconnect = fake.wait_for_disconnect(timeout=10)  # while the command goes on
        out, err = proc.communicate("second\n", timeout=20)
    assert disconnect.time - sent_at < 0.5
    assert proc.returncode == 0, err
    assert out == "\none two\n" and "| stopped]" in err and "| stop]" in err
    assert _chat_bodies(fake)[1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]


class _Server:
    """A loopback server that reads a request, then answers ``reply`` or nothing."""

    def __init__(self, reply: bytes | None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self.answered = threading.Event()  # a request arrived (and was answered, if any)
        self.hung_up = threading.Event()  # the client closed a connection left open
        self._reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self._listener:
            conn, _ = self._listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            if self._reply is not None:
                conn.sendall(self._reply)
                self.answered.set()
                return
            self.answered.set()
            while conn.recv(65536):
                pass
            self.hung_up.set()


def test_ctrl_c_while_the_server_has_not_answered() -> None:
    server = _Server(None)
    proc = _start("chat", "--base-url", server.base_url, "-m", "m", "Hi")
    assert server.answered.wait(20), "the request never arrived"
    proc.send_signal(signal.SIGINT)
    assert "| stopped]" in _assert_stopped(proc)
    assert server.hung_up.wait(5)


def _tgkill() -> Callable[[int, int, int], int] | None:
    """Linux's tgkill: a signal to one thread of a process (None where there is none)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    return getattr(libc, "tgkill", None)


@pytest.mark.skipif(_tgkill() is None, reason="needs Linux's tgkill to aim a signal at a thread")
def test_ctrl_c_that_misses_the_blocked_read_still_stops_the_command() -> None:
    # The kernel may hand a process's SIGINT to any thread, and one that lands just before
    # the main thread blocks in a read is only noted: either way nothing wakes that read.
    # Sending it to another thread of the command makes that happen every time.
    tgkill = _tgkill()
    assert tgkill is not None
    server = _Server(None)
    proc = _start("chat", "--base-url", server.base_url, "-m", "m", "Hi")
    assert server.answered.wait(20), "the request never arrived"
    others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
    assert others, "the command runs no thread besides its main one"
    assert tgkill(proc.pid, others[0], signal.SIGINT) == 0
    assert "| stopped]" in _assert_stopped(proc)
    assert server.hung_up.wait(5)


def test_ctrl_c_before_the_headers_closes_the_connection_at_once() -> None:
    # In a conversation the command goes on, so the connection closing is the stop's doing.
    server = _Server(None)
    proc = _start("chat", "--base-url", server.base_url, "-m", "m", "-i", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("Hi\n")
    proc.stdin.flush()
    assert server.answered.wait(20), "the request never arrived"
    proc.send_signal(signal.SIGINT)
    assert server.hung_up.wait(5)
    assert proc.poll() is None
    _, err = proc.communicate("", timeout=20)
    assert proc.returncode == 0 and "| stopped]" in err


def test_ctrl_c_during_a_retry_wait() -> None:
    reply = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 30\r\ncontent-length: 0\r\n"
    server = _Server(reply + b"connection: close\r\n\r\n")
    proc = _start("chat", "--base-url", server.base_url, "-m", "m", "Hi")
    assert server.answered.wait(20), "the request never arrived"
    proc.send_signal(signal.SIGINT)  # the client waits 30 s before it tries again
    assert "| stopped]" in _assert_stopped(proc)


def test_ctrl_c_during_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "Client", interrupted)
    assert main(["chat", *FAST, "Hi"]) == 130
    assert "[stopped]" in capsys.readouterr().err


# -- reasoning models ------------------------------------------------------------------


@pytest.fixture
def thinker() -> Iterator[str]:
    fake = FakeVLLM("The answer.", reasoning="Thinking it over.")
    with fake.serve() as server:
        yield server.base_url


def _chat_output(monkeypatch: pytest.MonkeyPatch, terminal: bool, *argv: str) -> tuple[str, str]:
    out: io.StringIO = _TerminalOut() if terminal else io.StringIO()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    assert main(["chat", "--no-metrics", *argv, "Hi"]) == 0
    return out.getvalue(), err.getvalue()


def test_reasoning_is_shown_dimmed_before_the_answer_on_a_terminal(
    thinker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = _chat_output(monkeypatch, True, "--base-url", thinker)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert out.startswith("\x1b[2m") and "\x1b[2mThe answer" not in out  # only it is dimmed
    assert plain == "Thinking it over.\n\nThe answer.\n"


def test_piped_output_is_the_answer_alone_unless_reasoning_is_asked_for(
    thinker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err = _chat_output(monkeypatch, False, "--base-url", thinker)
    assert out.strip() == "The answer." and "Thinking" not in err
    out, err = _chat_output(monkeypatch, False, "--base-url", thinker, "--reasoning")
    assert out.strip() == "The answer." and "Thinking it over." in err


def test_no_reasoning_hides_it_on_a_terminal(thinker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _chat_output(monkeypatch, True, "--base-url", thinker, "--no-reasoning")
    assert out.strip() == "The answer."


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_standard_input_that_is_not_utf8_is_a_usage_error(locale: str) -> None:
    # Python decodes it strictly under a UTF-8 locale, to lone surrogates under C.
    proc = subprocess.run(
        [sys.executable, "-m", "llmstream", "chat", *FAST],
        input=b"caf\xe9\n",
        capture_output=True,
        env=_env(LC_ALL=locale, PYTHONIOENCODING="utf-8" if locale == "C.UTF-8" else ""),
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "standard input is not UTF-8 text" in err and "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # `llmstream chat ... | head -c5`: the pipe closes while the answer streams.
    proc = _start("chat", "--fake", "--fake-token-delay", "0.001", "-t", "2000", "Hi")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(5)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    err = proc.stderr.read()
    proc.stderr.close()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
