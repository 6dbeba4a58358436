"""Every fault the emulator can inject, against both clients (the async one on httpx and on
aiohttp), with resume off and on.

Each row names the fault, what the caller must see (the answer, or an error type)
and how many requests it takes. Nothing may be lost or repeated: on success the
consumer's text is the answer exactly; on an error the partial result holds exactly
what the consumer received, and that is a prefix of the answer.

Print the matrix as a table (real loopback sockets, both clients):

    PYTHONPATH=src python -m tests.test_fault_matrix
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import pytest

import llmstream
from llmstream.testing import FakeVLLM, Fault

from .drivers import MODES, SOCKET_MODES, Outcome, collect

ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune — 八 ✨."
# Each case is decided by its fault, not by the clock: deadlines stay far above any delay
# a loaded machine adds, except the one a stall is there to trip. That one also bounds
# the attempt after the stall (a warm client, an answer sent at once), hence not less.
ROOMY = 10.0
STALL = 0.5
CALM = llmstream.Timeouts(first_token=ROOMY, idle=ROOMY, total=ROOMY)
# The emulator's events for ANSWER: the role, 18 tokens, the finish, usage and [DONE].
ANSWER_EVENTS = 22


@dataclass(frozen=True)
class Case:
    name: str
    faults: tuple[Fault, ...]
    expect: type[llmstream.LLMStreamError] | None  # None: the whole answer
    expect_with_resume: type[llmstream.LLMStreamError] | None
    requests: int  # chat requests sent, resume off
    requests_with_resume: int
    timeouts: llmstream.Timeouts = CALM


CASES = [
    Case("HTTP 503", (Fault.http_status(503),), None, None, 2, 2),
    Case(
        "HTTP 503, retry-after-ms 50",
        (Fault.http_status(503, headers={"retry-after-ms": "50"}),),
        None,
        None,
        2,
        2,
    ),
    Case("HTTP 429, Retry-After 0", (Fault.http_status(429, retry_after=0),), None, None, 2, 2),
    Case(
        "HTTP 503 x3 (retries exhausted)",
        (Fault.http_status(503),) * 3,
        llmstream.InternalServerError,
        llmstream.InternalServerError,
        3,
        3,
    ),
    Case(
        "HTTP 400",
        (Fault.http_status(400),),
        llmstream.BadRequestError,
        llmstream.BadRequestError,
        1,
        1,
    ),
    Case("disconnect at the first byte", (Fault.disconnect_before_headers(),), None, None, 2, 2),
    Case("disconnect mid-headers", (Fault.disconnect_mid_headers(),), None, None, 2, 2),
    Case("disconnect after the headers", (Fault.disconnect(after_chunks=0),), None, None, 2, 2),
    Case(
        "disconnect after 5 chunks",
        (Fault.disconnect(after_chunks=5),),
        llmstream.StreamInterrupted,
        None,
        1,
        2,
    ),
    Case(
        "in-band error after 5 chunks",
        (Fault.inband_error(after_chunks=5, code=503),),
        llmstream.ServerStreamError,
        None,
        1,
        2,
    ),
    Case(
        "stall before the first token",
        (Fault.stall(after_chunks=0),),
        None,
        None,
        2,
        2,
        llmstream.Timeouts(first_token=STALL, idle=ROOMY, total=ROOMY),
    ),
    Case(
        "stall after 5 chunks",
        (Fault.stall(after_chunks=5),),
        llmstream.IdleTimeout,
        None,
        1,
        2,
        llmstream.Timeouts(first_token=ROOMY, idle=STALL, total=ROOMY),
    ),
    Case(
        "malformed chunk after 5 chunks",
        (Fault.malformed_chunk(after_chunks=5),),
        llmstream.ProtocolError,
        llmstream.ProtocolError,
        1,
        1,
    ),
    Case(
        "truncated after 5 chunks (no [DONE])",
        (Fault.truncate(after_chunks=5),),
        llmstream.StreamInterrupted,
        None,
        1,
        2,
    ),
    Case("finished, no [DONE]", (Fault.no_done(),), None, None, 1, 1),
    # The answer is whole, and the server never ends the body: complete, never resumed.
    Case(
        "finished, then a stall before usage and [DONE]",
        (Fault.stall(after_chunks=ANSWER_EVENTS - 2),),
        None,
        None,
        1,
        1,
        llmstream.Timeouts(first_token=ROOMY, idle=STALL, total=ROOMY),
    ),
    Case(
        "[DONE], then a stall before the body's end",
        (Fault.stall(after_chunks=ANSWER_EVENTS),),
        None,
        None,
        1,
        1,
        llmstream.Timeouts(first_token=ROOMY, idle=STALL, total=ROOMY),
    ),
]


def _policy(resume: bool) -> llmstream.RetryPolicy:
    return llmstream.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, resume=resume)


async def run_case(case: Case, mode: str, resume: bool) -> tuple[Outcome, int]:
    fake = FakeVLLM(ANSWER)
    for fault in case.faults:
        fake.add_fault(fault)
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"timeout": case.timeouts, "retry": _policy(resume)},
        )
    chat = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    return outcome, len(chat)


def lost_and_repeated(outcome: Outcome) -> tuple[int, int]:
    """Characters of the answer the consumer never got, and characters it got twice."""
    got = outcome.text
    if outcome.error is None:
        common = len(got) if got == ANSWER else 0
        return len(ANSWER) - common, max(len(got) - len(ANSWER), 0)
    # On an error the consumer must hold exactly the partial, a prefix of the answer.
    partial = outcome.error.partial.text if outcome.error.partial is not None else ""
    repeated = 0 if ANSWER.startswith(got) else len(got)
    lost = len(partial) - len(got) if partial.startswith(got) else len(got)
    return max(lost, 0), repeated


@pytest.mark.anyio
@pytest.mark.parametrize("resume", [False, True], ids=["resume-off", "resume-on"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_fault_matrix(case: Case, mode: str, resume: bool) -> None:
    outcome, requests = await run_case(case, mode, resume)
    expected = case.expect_with_resume if resume else case.expect
    if expected is None:
        assert outcome.error is None, outcome.error
        assert outcome.text == ANSWER and outcome.final.complete
    else:
        assert type(outcome.error) is expected, outcome.error
        partial = outcome.error.partial
        assert (partial.text if partial is not None else "") == outcome.text
        assert ANSWER.startswith(outcome.text)
    assert requests == (case.requests_with_resume if resume else case.requests)
    assert lost_and_repeated(outcome) == (0, 0)


def print_table() -> None:
    """Run the matrix and print it as a Markdown table."""

    async def run_all() -> list[str]:
        rows = []
        for case in CASES:
            cells = []
            for resume in (False, True):
                results = []
                for mode in MODES:
                    outcome, requests = await run_case(case, mode, resume)
                    lost, repeated = lost_and_repeated(outcome)
                    what = type(outcome.error).__name__ if outcome.error else "complete"
                    results.append((what, requests, lost + repeated))
                (what, requests, bad), other = results[0], results[1]
                same = "" if results[0] == other else f" (sync: {other})"
                cells.append(f"{what}, {requests} req, {bad} lost/dup{same}")
            rows.append(f"| {case.name} | {cells[0]} | {cells[1]} |")
        return rows

    started = time.perf_counter()
    rows = anyio.run(run_all)
    print("| fault | resume off (async = sync) | resume on (async = sync) |")
    print("|---|---|---|")
    print("\n".join(rows))
    print(f"\n({len(CASES) * 4} runs in {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    print_table()
