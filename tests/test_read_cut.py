"""ReadCut: the cheap cancel scope of a pull read on asyncio; TimedCut: the same with a timer.

It must end the read it was asked to cut, and nothing else: a cancellation that came from
elsewhere (the caller's own scope, a task group) passes through as it would without it.
A TimedCut (a request's wait for its headers) also ends the wait when its delay passes,
and its timer must not outlive the wait.
"""

from __future__ import annotations

import asyncio
import sys

import anyio
import pytest

from llmstream._read_cut import ReadCut, TimedCut, cut_after, read_cut

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="ReadCut needs Task.uncancel() (Python 3.11+)"
)


async def _read_cut_by(cut: ReadCut, cutter: object) -> tuple[bool, int]:
    """Await a read that never ends inside ``cut``; (cancelled_caught, task.cancelling())."""
    forever = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(cutter)  # type: ignore[arg-type]
    with cut:
        await forever
    task = asyncio.current_task()
    assert task is not None
    return cut.cancelled_caught, task.cancelling()


def test_cancel_ends_the_read_and_leaves_the_task_uncancelled() -> None:
    async def main() -> tuple[bool, int]:
        cut = ReadCut()
        return await _read_cut_by(cut, cut.cancel)

    assert asyncio.run(main()) == (True, 0)


def test_the_same_cut_serves_read_after_read() -> None:
    async def main() -> list[tuple[bool, int]]:
        cut = ReadCut()
        seen = [await _read_cut_by(cut, cut.cancel) for _ in range(3)]
        with cut:  # a read that ends by itself is not reported as cut
            await asyncio.sleep(0)
        cut.cancel()  # outside a read: nothing to cut, and no cancellation left behind
        await asyncio.sleep(0)
        return [*seen, (cut.cancelled_caught, asyncio.current_task().cancelling())]  # type: ignore[union-attr]

    assert asyncio.run(main()) == [(True, 0)] * 3 + [(False, 0)]


@pytest.mark.parametrize("timed", [False, True], ids=["cut", "timed-cut"])
def test_a_cancellation_from_elsewhere_passes_through(timed: bool) -> None:
    async def main() -> bool:
        cut = TimedCut(asyncio.get_running_loop(), 10.0) if timed else ReadCut()
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(asyncio.CancelledError):
            await _read_cut_by(cut, task.cancel)
        return cut.cancelled_caught

    assert asyncio.run(main()) is False


@pytest.mark.parametrize("first", ["cut", "outer"])
def test_a_cancellation_from_elsewhere_in_the_same_turn_still_wins(first: str) -> None:
    # The cut undoes only its own request: the other one stays, for its owner to see.
    async def main() -> tuple[bool, int]:
        cut = ReadCut()
        task = asyncio.current_task()
        assert task is not None
        both = [cut.cancel, task.cancel] if first == "cut" else [task.cancel, cut.cancel]
        with pytest.raises(asyncio.CancelledError):
            await _read_cut_by(cut, lambda: [cancel() for cancel in both])
        # The outer request is still counted, until its owner acts on it.
        return cut.cancelled_caught, task.cancelling()

    assert asyncio.run(main()) == (False, 1)


def test_read_cut_is_made_where_asyncio_counts_cancellations() -> None:
    assert isinstance(read_cut(), ReadCut)


# -- TimedCut and cut_after ----------------------------------------------------------------


def test_a_timed_cut_ends_the_wait_when_its_delay_passes() -> None:
    async def main() -> tuple[bool, int, float]:
        loop = asyncio.get_running_loop()
        forever = loop.create_future()
        started = loop.time()
        async with asyncio.timeout(5):  # a cut that never fires fails here, not hangs
            with TimedCut(loop, 0.05) as cut:
                await forever
        task = asyncio.current_task()
        assert task is not None
        return cut.cancelled_caught, task.cancelling(), loop.time() - started

    caught, cancelling, waited = asyncio.run(main())
    assert (caught, cancelling) == (True, 0)
    assert 0.04 <= waited < 2.0


def test_a_timed_cut_that_ended_does_not_cut_what_the_task_awaits_next() -> None:
    # Its timer is disarmed, and a cut outside its wait is a no-op besides.
    async def main() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        with TimedCut(loop, 0.05) as cut:
            await asyncio.sleep(0)
        await asyncio.sleep(0.15)  # past the delay: this sleep must not be cut
        task = asyncio.current_task()
        assert task is not None
        return cut.cancelled_caught, task.cancelling()

    assert asyncio.run(main()) == (False, 0)


def test_a_timed_cut_without_a_delay_ends_only_at_cancel() -> None:
    async def main() -> tuple[bool, int]:
        cut = TimedCut(asyncio.get_running_loop(), None)
        return await _read_cut_by(cut, cut.cancel)

    assert asyncio.run(main()) == (True, 0)


def test_cut_after_is_a_timed_cut_on_asyncio_and_an_anyio_scope_on_trio() -> None:
    async def kind() -> object:
        scope = cut_after(0.01)
        with scope:
            await anyio.sleep(1)  # cut after 10 ms either way
        assert scope.cancelled_caught
        return type(scope)

    assert anyio.run(kind, backend="asyncio") is TimedCut
    assert issubclass(anyio.run(kind, backend="trio"), anyio.CancelScope)  # type: ignore[arg-type]
