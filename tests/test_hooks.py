"""Hooks: every call tells its steps, in order, and ends with exactly one finished or failed event.

Both clients, both anyio backends, real loopback sockets (the emulator's server).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import llmstream
from llmstream import _hooks
from llmstream.testing import FakeVLLM, Fault

from .conftest import EndlessServer
from .drivers import MODES, collect

pytestmark = pytest.mark.anyio

MODEL = "llmstream/fake-model"
ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."
FAST = llmstream.RetryPolicy(initial_backoff=0.001, max_backoff=0.01)
ENDS = (llmstream.CallFinished, llmstream.CallFailed)


class Recorder:
    """A hook that keeps every event it is told (from any thread)."""

    def __init__(self) -> None:
        self.events: list[llmstream.CallEvent] = []

    def __call__(self, event: llmstream.CallEvent) -> None:
        self.events.append(event)

    @property
    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    @property
    def ends(self) -> list[llmstream.CallEvent]:
        return [e for e in self.events if isinstance(e, ENDS)]

    def end(self) -> llmstream.CallFinished | llmstream.CallFailed:
        [end] = self.ends
        assert self.events[-1] is end, "the end is the last event of the call"
        assert isinstance(end, ENDS)
        return end


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there now


# -- what a call tells ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_complete_call_tells_each_step_in_order(mode: str) -> None:
    hook = Recorder()
    with FakeVLLM(ANSWER).serve() as server:
        outcome = await collect(
            mode, base_url=server.base_url, client_kwargs={"model": MODEL, "hooks": [hook]}
        )
    assert outcome.error is None and outcome.text == ANSWER
    assert hook.kinds == ["RequestSent", "ResponseHeaders", "FirstToken", "CallFinished"]
    call = hook.events[0].call
    assert all(e.call is call for e in hook.events)
    assert len(call.call_id) == 32 and call.request_model == MODEL
    assert call.url == server.base_url
    assert (call.server_address, call.server_port) == ("127.0.0.1", server.port)
    assert [e.attempt for e in hook.events] == [1, 1, 1, 1]
    times = [e.at for e in hook.events]
    assert times == sorted(times)
    sent, headers, _, end = hook.events
    assert isinstance(sent, llmstream.RequestSent) and sent.body["model"] == MODEL
    assert not sent.hedge and sent.endpoint is None
    assert isinstance(headers, llmstream.ResponseHeaders) and headers.status == 200
    assert headers.headers["content-type"].startswith("text/event-stream")
    assert isinstance(end, llmstream.CallFinished)
    assert end.status == "complete" and end.finish_reasons == ("stop",)
    assert end.result == outcome.result
    itl = end.result.metrics.inter_token_latency
    assert itl is not None and len(end.chunk_gaps) == itl.count
    assert max(end.chunk_gaps) == pytest.approx(itl.max)


@pytest.mark.parametrize("mode", MODES)
async def test_a_length_finish_is_complete_with_its_reason(mode: str) -> None:
    hook = Recorder()
    with FakeVLLM(ANSWER).serve() as server:
        await collect(mode, base_url=server.base_url, client_kwargs={"hooks": [hook]}, max_tokens=3)
    end = hook.end()
    assert isinstance(end, llmstream.CallFinished)
    assert (end.status, end.finish_reasons) == ("complete", ("length",))


# -- a stream stopped before its end is cancelled, never a success ------------------

STOPS = ["break", "close", "cancel", "interrupt"]


async def _stop_early(mode: str, how: str, base_url: str, hook: Recorder) -> None:
    """Read two pieces of a long answer, then stop the stream ``how``."""
    if mode == "async":
        async with llmstream.AsyncClient(base_url, hooks=[hook]) as client:
            with pytest.raises(KeyboardInterrupt) if how == "interrupt" else _nothing():
                async with client.stream("Hi") as stream:
                    pieces = 0
                    async for _ in stream:
                        pieces += 1
                        if pieces < 2:
                            continue
                        if how == "close":
                            await stream.aclose()
                        elif how == "cancel":
                            stream.cancel()
                            continue  # the loop ends by itself
                        elif how == "interrupt":
                            raise KeyboardInterrupt  # Ctrl-C in the consumer's block
                        break
        return

    def run() -> None:
        with llmstream.Client(base_url, hooks=[hook]) as client:
            with pytest.raises(KeyboardInterrupt) if how == "interrupt" else _nothing():
                with client.stream("Hi") as stream:
                    for pieces, _ in enumerate(stream, 1):
                        if pieces < 2:
                            continue
                        if how == "close":
                            stream.close()
                        elif how == "cancel":
                            stream.cancel()
                            continue
                        elif how == "interrupt":
                            raise KeyboardInterrupt
                        break

    await anyio.to_thread.run_sync(run)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_stopped_early_finishes_cancelled(mode: str, how: str) -> None:
    hook = Recorder()
    with FakeVLLM(tokens=["w "] * 500, token_delay=0.005).serve() as server:
        await _stop_early(mode, how, server.base_url, hook)
    end = hook.end()
    assert isinstance(end, llmstream.CallFinished)
    assert end.status == "cancelled" and end.result.text.startswith("w w")
    assert hook.kinds[:3] == ["RequestSent", "ResponseHeaders", "FirstToken"]


async def test_a_cancelled_task_finishes_its_call_cancelled() -> None:
    hook = Recorder()
    with FakeVLLM(tokens=["w "] * 500, token_delay=0.005).serve() as server:
        async with llmstream.AsyncClient(server.base_url, hooks=[hook]) as client:
            with anyio.CancelScope() as scope:
                async with client.stream("Hi") as stream:
                    async for _ in stream:
                        scope.cancel()  # the task is cancelled while it reads
    end = hook.end()
    assert isinstance(end, llmstream.CallFinished) and end.status == "cancelled"


@pytest.mark.parametrize("mode", MODES)
async def test_a_budget_stop_finishes_with_status_budget(mode: str, endless: EndlessServer) -> None:
    hook = Recorder()
    await collect(
        mode,
        base_url=endless.base_url,  # a server that goes on past max_tokens
        client_kwargs={"hooks": [hook], "model": "m", "include_usage": False},
        budget=llmstream.CallBudget(completion_tokens=3),
    )
    end = hook.end()
    assert isinstance(end, llmstream.CallFinished) and end.status == "budget"


# -- retries, resumes and failures ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_retry_and_a_resume_are_told_apart(mode: str) -> None:
    hook = Recorder()
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(503))
    fake.add_fault(Fault.disconnect(after_chunks=4))
    policy = llmstream.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, resume=True)
    with fake.serve() as server:
        outcome = await collect(
            mode, base_url=server.base_url, client_kwargs={"hooks": [hook]}, retry=policy
        )
    assert outcome.text == ANSWER
    assert hook.kinds == [
        "RequestSent",
        "ResponseHeaders",
        "RetryEvent",
        "RequestSent",
        "ResponseHeaders",
        "FirstToken",
        "RetryEvent",
        "RequestSent",
        "ResponseHeaders",
        "FirstToken",
        "CallFinished",
    ]
    retry, resume = [e for e in hook.events if isinstance(e, llmstream.RetryEvent)]
    assert (retry.kind, retry.attempt) == ("retry", 2)
    assert isinstance(retry.error, llmstream.InternalServerError)
    assert (resume.kind, resume.attempt) == ("resume", 3)
    assert isinstance(resume.error, llmstream.StreamInterrupted)
    assert len({id(e.call) for e in hook.events}) == 1
    headers = [e for e in hook.events if isinstance(e, llmstream.ResponseHeaders)]
    assert [(h.attempt, h.status) for h in headers] == [(1, 503), (2, 200), (3, 200)]
    end = hook.end()
    assert isinstance(end, llmstream.CallFinished) and end.attempt == 3
    assert (end.result.retries, end.result.resumes) == (1, 1)


FAILURES: dict[str, tuple[type[llmstream.LLMStreamError], int]] = {
    "refused": (llmstream.APIConnectionError, 2),
    "404": (llmstream.NotFoundError, 1),
    "503 every time": (llmstream.InternalServerError, 2),
    "first-token deadline": (llmstream.FirstTokenTimeout, 1),
    "broken mid-answer": (llmstream.StreamInterrupted, 1),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("mode", MODES)
async def test_a_failed_call_ends_with_one_failed_event(mode: str, failure: str) -> None:
    error_type, attempts = FAILURES[failure]
    hook = Recorder()
    fake = FakeVLLM(ANSWER, ttft=2.0 if failure == "first-token deadline" else 0.0)
    for _ in range(3):
        if failure == "404":
            fake.add_fault(Fault.http_status(404))
        elif failure == "503 every time":
            fake.add_fault(Fault.http_status(503))
        elif failure == "broken mid-answer":
            fake.add_fault(Fault.disconnect(after_chunks=3))
    retry = llmstream.RetryPolicy(max_retries=1, initial_backoff=0.001, max_backoff=0.01)
    if failure == "first-token deadline":
        retry = llmstream.RetryPolicy(max_retries=0)
    with fake.serve() as server:
        url = _refused_url() if failure == "refused" else server.base_url
        outcome = await collect(
            mode,
            base_url=url,
            client_kwargs={"hooks": [hook], "model": MODEL},
            retry=retry,
            timeout=llmstream.Timeouts(first_token=0.2),
        )
    assert isinstance(outcome.error, error_type)
    end = hook.end()
    assert isinstance(end, llmstream.CallFailed) and end.error is outcome.error
    assert isinstance(end.result, llmstream.StreamResult) and end.result.status != "complete"
    sent = [e for e in hook.events if isinstance(e, llmstream.RequestSent)]
    assert [e.attempt for e in sent] == list(range(1, attempts + 1))
    assert end.attempt == attempts and end.call.request_model == MODEL
    retries = [e for e in hook.events if isinstance(e, llmstream.RetryEvent)]
    assert len(retries) == attempts - 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_refused_by_its_budget_before_any_request_fails_once(mode: str) -> None:
    hook = Recorder()
    with FakeVLLM(ANSWER).serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [hook], "model": MODEL},
            prompt="a long prompt " * 50,
            budget=llmstream.CallBudget(prompt_tokens=5),
        )
    assert isinstance(outcome.error, llmstream.BudgetExceeded)
    assert hook.kinds == ["CallFailed"]
    assert hook.end().attempt == 0


# -- one hook, many calls ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_one_hook_follows_many_concurrent_calls(mode: str) -> None:
    hook = Recorder()
    calls = 8
    with FakeVLLM(tokens=["w "] * 20, token_delay=0.002).serve() as server:
        if mode == "async":
            async with llmstream.AsyncClient(server.base_url, hooks=[hook]) as client:

                async def one() -> None:
                    await client.complete("Hi")

                async with anyio.create_task_group() as tg:
                    for _ in range(calls):
                        tg.start_soon(one)
        else:

            def run() -> None:
                with llmstream.Client(server.base_url, hooks=[hook]) as client:
                    threads = [
                        threading.Thread(target=client.complete, args=("Hi",)) for _ in range(calls)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

            await anyio.to_thread.run_sync(run)
    by_call: dict[str, list[str]] = {}
    for event in hook.events:
        by_call.setdefault(event.call.call_id, []).append(type(event).__name__)
    assert len(by_call) == calls
    for kinds in by_call.values():
        assert kinds == ["RequestSent", "ResponseHeaders", "FirstToken", "CallFinished"]


# -- hooks that misbehave ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_hook_that_raises_is_logged_and_the_stream_goes_on(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-hooks-secret-0123456789"

    def broken(event: llmstream.CallEvent) -> None:
        raise RuntimeError(f"broken on {type(event).__name__}")

    hook = Recorder()
    caplog.set_level(logging.ERROR, logger="llmstream")
    with FakeVLLM(ANSWER, api_key=secret).serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [broken, hook], "api_key": secret},
        )
    assert outcome.error is None and outcome.text == ANSWER
    assert len(hook.events) == 4  # the next hook is still told everything
    failures = [r for r in caplog.records if "hook" in r.getMessage()]
    assert len(failures) == 4
    assert all(r.name == "llmstream" and r.exc_info is not None for r in failures)
    assert "broken on CallFinished" in caplog.text  # the traceback is there
    assert secret not in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_a_hook_may_cancel_the_stream(mode: str) -> None:
    hook = Recorder()
    streams: list[Any] = []

    def stop_at_first_token(event: llmstream.CallEvent) -> None:
        if isinstance(event, llmstream.FirstToken):
            streams[0].cancel()  # from inside the hook: no deadlock, no event out of order

    with FakeVLLM(tokens=["w "] * 500, token_delay=0.005).serve() as server:
        if mode == "async":
            async with llmstream.AsyncClient(
                server.base_url, hooks=[stop_at_first_token, hook]
            ) as client:
                streams.append(client.stream("Hi"))  # the hook may run before the block does
                async with streams[0] as stream:
                    async for _ in stream:
                        pass
        else:

            def run() -> None:
                with llmstream.Client(server.base_url, hooks=[stop_at_first_token, hook]) as c:
                    streams.append(c.stream("Hi"))
                    with streams[0] as stream:
                        for _ in stream:
                            pass

            await anyio.to_thread.run_sync(run)
    assert hook.kinds == ["RequestSent", "ResponseHeaders", "FirstToken", "CallFinished"]
    assert hook.end().status == "cancelled"


# -- per call, complete(), and what each client accepts ----------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_hooks_of_a_call_are_added_to_the_clients(mode: str) -> None:
    everyone, this_call = Recorder(), Recorder()
    fake = FakeVLLM(ANSWER)
    with fake.serve() as server:
        if mode == "async":
            async with llmstream.AsyncClient(server.base_url, hooks=[everyone]) as client:
                await client.complete("first", hooks=[this_call])
                await client.complete("second")
        else:

            def run() -> None:
                with llmstream.Client(server.base_url, hooks=[everyone]) as client:
                    client.complete("first", hooks=[this_call])
                    client.complete("second")

            await anyio.to_thread.run_sync(run)
    assert len(everyone.ends) == 2 and len(this_call.ends) == 1
    assert this_call.events[0].call is everyone.events[0].call
    sent = [r.json for r in fake.requests if r.path.endswith("/chat/completions")]
    assert len(sent) == 2 and all(body is not None and "hooks" not in body for body in sent)


async def _an_async_hook(event: llmstream.CallEvent) -> None:
    return None


class _AsyncCallable:
    async def __call__(self, event: llmstream.CallEvent) -> None:
        return None


@pytest.mark.parametrize("hook", [_an_async_hook, _AsyncCallable()], ids=["function", "object"])
def test_the_sync_client_refuses_async_hooks(hook: Callable[..., Any]) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match=r"async function.*AsyncClient"):
        llmstream.Client("http://127.0.0.1:9/v1", hooks=[hook])
    with llmstream.Client("http://127.0.0.1:9/v1") as client:
        with pytest.raises(llmstream.InvalidRequestError, match="async function"):
            client.stream("Hi", hooks=[hook])


@pytest.mark.parametrize("hooks", [print, ["not callable"]], ids=["not a list", "not callable"])
def test_hooks_must_be_a_list_of_callables(hooks: Any) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="hooks"):
        llmstream.AsyncClient("http://127.0.0.1:9/v1", hooks=hooks)


# -- async hooks (AsyncClient) ----------------------------------------------------------


async def test_async_hooks_are_awaited_in_order_with_the_sync_ones() -> None:
    told: list[str] = []

    async def slow(event: llmstream.CallEvent) -> None:
        await anyio.sleep(0.01)  # the stream waits for it before it goes on
        told.append("async " + type(event).__name__)

    def fast(event: llmstream.CallEvent) -> None:
        told.append("sync " + type(event).__name__)

    with FakeVLLM(ANSWER).serve() as server:
        async with llmstream.AsyncClient(server.base_url, hooks=[slow, fast]) as client:
            result = await client.complete("Hi")
    assert result.complete
    kinds = ["RequestSent", "ResponseHeaders", "FirstToken", "CallFinished"]
    assert told == [f"{how} {kind}" for kind in kinds for how in ("async", "sync")]


async def test_an_async_hook_that_hangs_is_cut_and_the_stream_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_hooks, "ASYNC_HOOK_TIMEOUT", 0.05)
    cut: list[str] = []

    async def hangs(event: llmstream.CallEvent) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cut.append(type(event).__name__)

    caplog.set_level(logging.ERROR, logger="llmstream")
    with FakeVLLM(ANSWER).serve() as server:
        async with llmstream.AsyncClient(server.base_url, hooks=[hangs]) as client:
            async with client.stream("Hi") as stream:
                text = "".join([piece async for piece in stream])
            # Every call of the hook was cut by the time the block ends: nothing runs on.
            assert cut == ["RequestSent", "ResponseHeaders", "FirstToken", "CallFinished"]
    assert text == ANSWER
    assert caplog.text.count("took longer than 0.05 s") == 4


async def test_an_async_stream_dropped_after_a_break_ends_its_call_and_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `async for ... : break` without `async with` and without aclose(): the stream is
    # dropped unclosed. Its call still ends (cancelled) for the hooks that need no
    # awaiting, an async hook is logged as not run, and the server sees the connection go.
    events: list[llmstream.CallEvent] = []

    async def async_hook(event: llmstream.CallEvent) -> None:
        pass

    fake = FakeVLLM(tokens=[f"w{i} " for i in range(500)], token_delay=0.01)
    with fake.serve() as running:
        async with llmstream.AsyncClient(
            running.base_url, hooks=[events.append, async_hook]
        ) as client:
            with caplog.at_level(logging.ERROR, logger="llmstream"):
                async for _ in client.stream("Hi"):
                    break
            ends = [
                e for e in events if isinstance(e, llmstream.CallFinished | llmstream.CallFailed)
            ]
            assert [e.status for e in ends] == ["cancelled"]
            assert "a stream dropped without aclose() cannot await" in caplog.text
            disconnect = await fake.await_disconnect(timeout=5)
    assert disconnect.chunks_sent < 500
