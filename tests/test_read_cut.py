"""ReadCut: the cheap cancel scope of a pull read on asyncio.

It must end the read it was asked to cut, and nothing else: a cancellation that came from
elsewhere (the caller's own scope, a task group) passes through as it would without it.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from llmstream._read_cut import ReadCut, read_cut

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


def test_a_cancellation_from_elsewhere_passes_through() -> None:
    async def main() -> bool:
        cut = ReadCut()
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
