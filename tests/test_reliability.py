"""Retries, deadlines and resume, for both clients, against the emulator.

The async client runs on httpx and on aiohttp; on aiohttp the emulator is served over a
loopback socket (drivers.collect), on httpx mostly in process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest
import tenacity

import llmstream
from llmstream._retry import retry_after_seconds
from llmstream.testing import FakeVLLM, Fault

from .drivers import SOCKET_MODES, collect

pytestmark = pytest.mark.anyio

ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune — 八 ✨."
FAST = llmstream.RetryPolicy(initial_backoff=0.001, max_backoff=0.01)
RESUME = llmstream.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, resume=True)
# An idle limit a loaded machine does not reach between two events sent back to back.
IDLE = 0.3


def _client(fake: FakeVLLM, **kwargs: Any) -> dict[str, Any]:
    return {"transport": fake.transport(), "client_kwargs": kwargs}


# -- retries ------------------------------------------------------------------


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_503_503_200_is_retried_with_events_and_a_count(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(503))
    fake.add_fault(Fault.http_status(503))
    events: list[llmstream.RetryEvent] = []
    policy = llmstream.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, on_retry=events.append)
    outcome = await collect(mode, **_client(fake, retry=policy))
    assert outcome.error is None and outcome.text == ANSWER
    assert outcome.final.retries == 2 and outcome.final.resumes == 0
    assert [(e.kind, e.attempt) for e in events] == [("retry", 2), ("retry", 3)]
    assert all(0 <= e.delay <= 0.05 for e in events)
    assert all(isinstance(e.error, llmstream.InternalServerError) for e in events)
    assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 3


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_retries_stop_after_max_retries(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    for _ in range(5):
        fake.add_fault(Fault.http_status(502))
    outcome = await collect(mode, **_client(fake, retry=FAST))
    assert isinstance(outcome.error, llmstream.InternalServerError)
    assert outcome.error.status_code == 502
    assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_client_errors_are_never_retried(mode: str, status: int) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(status))
    always = llmstream.RetryPolicy(
        max_retries=5, retry_statuses=frozenset({status, 503}), initial_backoff=0.001
    )
    outcome = await collect(mode, **_client(fake, retry=always))
    assert isinstance(outcome.error, llmstream.APIStatusError)
    assert outcome.error.status_code == status
    assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 1


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_retry_after_is_honoured(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(429, headers={"retry-after-ms": "150"}))
    events: list[llmstream.RetryEvent] = []
    policy = llmstream.RetryPolicy(on_retry=events.append)
    started = time.perf_counter()
    outcome = await collect(mode, **_client(fake, retry=policy))
    assert outcome.text == ANSWER
    assert events[0].delay == pytest.approx(0.15)
    assert time.perf_counter() - started >= 0.15


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_retry_after_above_the_cap_is_not_waited_for(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(503, retry_after=3600))
    started = time.perf_counter()
    outcome = await collect(mode, **_client(fake, retry=llmstream.RetryPolicy(max_retry_after=5)))
    assert isinstance(outcome.error, llmstream.InternalServerError)
    assert outcome.error.headers["retry-after"] == "3600"
    assert time.perf_counter() - started < 1.0


def test_retry_after_forms() -> None:
    now = 1_000_000.0
    assert retry_after_seconds({"Retry-After": "2"}, now=now) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250"}, now=now) == 0.25
    date = "Mon, 12 Jan 1970 13:46:50 GMT"  # 1,000,010 s after the epoch
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(10.0)
    assert retry_after_seconds({"retry-after": "soon"}, now=now) is None
    assert retry_after_seconds({}, now=now) is None


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_connection_failures_before_the_response_are_retried(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect_before_headers())
    fake.add_fault(Fault.disconnect_mid_headers())
    with fake.serve() as server:
        outcome = await collect(mode, base_url=server.base_url, client_kwargs={"retry": FAST})
    assert outcome.text == ANSWER and outcome.final.retries == 2


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_break_before_any_output_is_retried_transparently(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=1))  # the role chunk only
    outcome = await collect(mode, **_client(fake, retry=FAST))
    assert outcome.error is None and outcome.text == ANSWER
    assert outcome.final.retries == 1 and outcome.final.complete


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_tenacity_strategies_can_be_passed(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    for _ in range(3):
        fake.add_fault(Fault.http_status(500))
    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_fixed(0))
    outcome = await collect(mode, **_client(fake, retry=retrying))
    assert outcome.text == ANSWER and outcome.final.retries == 3


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_every_retry_is_logged_without_the_api_key(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeVLLM(ANSWER, api_key="sk-secret-key")
    fake.add_fault(Fault.http_status(503))
    caplog.set_level(logging.INFO, logger="llmstream")
    outcome = await collect(mode, **_client(fake, retry=FAST, api_key="sk-secret-key"))
    assert outcome.text == ANSWER
    records = [r for r in caplog.records if r.name == "llmstream"]
    assert len(records) == 1 and "retry, attempt 2" in records[0].getMessage()
    assert "sk-secret-key" not in caplog.text


# -- deadlines ----------------------------------------------------------------


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_first_token_deadline(mode: str) -> None:
    fake = FakeVLLM(ANSWER, ttft=5.0)
    timeouts = llmstream.Timeouts(first_token=0.2)
    started = time.perf_counter()
    outcome = await collect(mode, **_client(fake, timeout=timeouts, retry=FAST))
    assert isinstance(outcome.error, llmstream.FirstTokenTimeout)
    assert outcome.error.partial is not None and outcome.error.partial.text == ""
    assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 3
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_keep_alive_comments_do_not_reset_the_first_token_deadline(mode: str) -> None:
    fake = FakeVLLM(ANSWER, ttft=5.0, keep_alive=0.02)
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"timeout": llmstream.Timeouts(first_token=0.3), "retry": 0},
        )
    assert isinstance(outcome.error, llmstream.FirstTokenTimeout)


@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("buffer", [64, 0], ids=["read-ahead", "pull"])
async def test_a_resumed_request_gets_its_own_first_token_deadline(mode: str, buffer: int) -> None:
    # The first request streams, then breaks; the one that resumes it stalls before its
    # first token. Its first-token deadline (0.3 s) is far closer than the idle deadline
    # (5 s) that the deadline watch was timed for while the first one streamed.
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=3))
    fake.add_fault(Fault.stall(after_chunks=0))
    timeouts = llmstream.Timeouts(first_token=0.3, idle=5.0, total=20.0)
    started = time.perf_counter()
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"timeout": timeouts, "retry": RESUME},
            buffer=buffer,
        )
    assert outcome.error is None and outcome.text == ANSWER
    assert outcome.final.resumes == 2  # the stalled request was cut, then resumed again
    assert time.perf_counter() - started < 2.5  # not the 5 s of the idle deadline


@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("buffer", [64, 0], ids=["read-ahead", "pull"])
async def test_idle_deadline_ignores_keep_alive_comments(mode: str, buffer: int) -> None:
    # buffer=0: the consumer's own reads of comments (no item) must not restart the clock.
    fake = FakeVLLM(ANSWER, keep_alive=0.02)
    fake.add_fault(Fault.stall(after_chunks=4))
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            # The total deadline only ends a run whose idle deadline failed to fire.
            client_kwargs={"timeout": llmstream.Timeouts(idle=0.3, total=10), "retry": 0},
            buffer=buffer,
        )
    assert isinstance(outcome.error, llmstream.IdleTimeout)
    assert outcome.final.text == outcome.text and outcome.text
    assert fake.wait_for_disconnect().chunks_sent == 4  # the stalled request was cancelled


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_total_deadline_covers_the_whole_call(mode: str) -> None:
    fake = FakeVLLM(ANSWER, token_delay=0.05)
    timeouts = llmstream.Timeouts(total=0.4)
    outcome = await collect(mode, **_client(fake, timeout=timeouts))
    assert isinstance(outcome.error, llmstream.TotalTimeout)
    assert 0 < len(outcome.final.text) < len(ANSWER)
    assert outcome.final.metrics.duration < 1.0


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_slow_consumer_is_not_an_idle_server(mode: str) -> None:
    fake = FakeVLLM("a b c d e f g h")
    # The reader holds "b" in the full buffer while the consumer works on "a". In
    # process, the server's pause starts when the client asks for the event after "b":
    # so the first read once the consumer is back waits for the server, with a deadline.
    fake.add_fault(Fault.stall(after_chunks=3, seconds=IDLE / 3))
    outcome = await collect(
        mode,
        **_client(fake, timeout=llmstream.Timeouts(idle=IDLE)),
        buffer=1,
        busy=2 * IDLE,
    )
    assert outcome.error is None and outcome.text == "a b c d e f g h"


# -- resume -------------------------------------------------------------------


@pytest.mark.parametrize("after", [3, 5, 9])
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_resume_continues_a_broken_stream_with_nothing_lost_or_repeated(
    mode: str, after: int
) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=after))
    outcome = await collect(mode, **_client(fake, retry=RESUME), max_tokens=200)
    assert outcome.error is None
    assert outcome.text == ANSWER  # every character exactly once
    result = outcome.final
    assert result.text == ANSWER and result.complete and result.resumes == 1
    second = [r for r in fake.requests if r.path.endswith("/chat/completions")][1].json
    assert second is not None
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    partial = second["messages"][-1]
    assert partial["role"] == "assistant" and ANSWER.startswith(partial["content"])
    assert second["max_tokens"] < 200


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_resume_after_an_in_band_error(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.inband_error(after_chunks=6, code=503))
    outcome = await collect(mode, **_client(fake, retry=RESUME))
    assert outcome.text == ANSWER and outcome.final.resumes == 1


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_resume_counts_usage_across_requests(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=5))
    outcome = await collect(mode, **_client(fake, retry=RESUME))
    usage = outcome.final.usage
    assert usage is not None
    plain = await collect(mode, **_client(FakeVLLM(ANSWER)))
    assert plain.final.usage is not None
    # The continuation's prompt holds the partial answer, so the call costs more prompt.
    assert usage.prompt_tokens > plain.final.usage.prompt_tokens
    assert usage.completion_tokens >= plain.final.usage.completion_tokens


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_without_resume_a_break_after_text_raises_with_the_partial(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=5))
    outcome = await collect(mode, **_client(fake, retry=FAST))
    assert type(outcome.error) is llmstream.StreamInterrupted
    assert outcome.final.text == outcome.text and ANSWER.startswith(outcome.text)
    assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 1


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_resume_gives_up_after_max_resumes(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    for after in (4, 3, 3):
        fake.add_fault(Fault.disconnect(after_chunks=after))
    policy = llmstream.RetryPolicy(initial_backoff=0.001, resume=True, max_resumes=2)
    outcome = await collect(mode, **_client(fake, retry=policy))
    assert isinstance(outcome.error, llmstream.StreamInterrupted)
    assert outcome.final.resumes == 2
    assert ANSWER.startswith(outcome.text) and outcome.final.text == outcome.text


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("timeout", [-1, 0, "10"])
def test_bad_timeouts_fail_before_any_request(timeout: object) -> None:
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.Client("http://x.test/v1", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.Timeouts(idle=-5)


def test_bad_retry_settings_fail_before_any_request() -> None:
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.Client("http://x.test/v1", retry=-1)
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.Client("http://x.test/v1", retry="twice")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_each_resume_shrinks_max_tokens_by_what_was_generated(mode: str) -> None:
    fake = FakeVLLM(tokens=[f"t{i} " for i in range(40)])
    fake.add_fault(Fault.disconnect(after_chunks=4))
    fake.add_fault(Fault.disconnect(after_chunks=4))
    outcome = await collect(mode, **_client(fake, retry=RESUME, include_usage=False), max_tokens=10)
    sent = [r.json["max_tokens"] for r in fake.requests if r.json and "max_tokens" in r.json]
    assert sent == [10, 7, 4]
    assert outcome.text == "".join(f"t{i} " for i in range(10))
    assert outcome.final.finish_reason == "length" and outcome.final.resumes == 2


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_first_token_and_total_deadlines_bound_the_wait_for_headers(mode: str) -> None:
    import socket

    silent = socket.socket()  # accepts connections (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    try:
        for timeouts, error in (
            (llmstream.Timeouts(first_token=0.3, idle=3), llmstream.FirstTokenTimeout),
            (llmstream.Timeouts(total=0.3, idle=3), llmstream.TotalTimeout),
        ):
            started = time.perf_counter()
            outcome = await collect(
                mode, base_url=url, client_kwargs={"model": "m", "timeout": timeouts, "retry": 0}
            )
            assert type(outcome.error) is error
            assert time.perf_counter() - started < 1.5
    finally:
        silent.close()


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_tenacity_exception_type_predicate_is_kept(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(503))
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(llmstream.RateLimitError),
        wait=tenacity.wait_fixed(0),
    )
    outcome = await collect(mode, **_client(fake, retry=retrying))
    assert isinstance(outcome.error, llmstream.InternalServerError)  # 503 is not a 429


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_resume_honours_retry_after_and_its_cap(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=5))
    fake.add_fault(Fault.http_status(429, retry_after=3600))
    policy = llmstream.RetryPolicy(resume=True, max_retry_after=5, initial_backoff=0.001)
    started = time.perf_counter()
    outcome = await collect(mode, **_client(fake, retry=policy))
    assert isinstance(outcome.error, llmstream.RateLimitError)
    assert time.perf_counter() - started < 1.0


def test_retryable_tells_what_another_try_could_fix() -> None:
    policy = llmstream.RetryPolicy()
    assert policy.retryable(llmstream.APIConnectionError("refused"))
    assert policy.retryable(llmstream.StreamInterrupted("cut", partial=None))
    assert policy.retryable(llmstream.IdleTimeout("stalled", partial=None))
    assert not policy.retryable(llmstream.TotalTimeout("time is spent", partial=None))


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_no_first_token_limit_means_a_long_prefill_is_waited_out(mode: str) -> None:
    # first_token=None: no limit before the first token, whatever idle says after it.
    fake = FakeVLLM("one two three", ttft=0.8)
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"timeout": llmstream.Timeouts(first_token=None, idle=0.2)},
        )
    assert outcome.error is None and outcome.text == "one two three"


@pytest.mark.anyio
async def test_a_slow_loop_without_async_with_is_not_server_idleness() -> None:
    fake = FakeVLLM("one two three four")
    # The server pauses after "one" a little longer than the consumer works on it: the
    # read the consumer then asks for waits for the server, and the time before that read
    # is the consumer's, not the server's.
    fake.add_fault(Fault.stall(after_chunks=2, seconds=2 * IDLE + IDLE / 3))
    timeouts = llmstream.Timeouts(idle=IDLE)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, timeout=timeouts) as client:
            stream = client.stream("hi")  # iterated directly: it reads when the loop asks
            pieces = []
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 1:
                    await anyio.sleep(2 * IDLE)  # the consumer's own work, longer than idle
    assert "".join(pieces) == "one two three four"
