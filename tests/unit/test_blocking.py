"""BlockingPool: results, exceptions, cancellation, and threads made only as needed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from postroom.blocking import BlockingPool


def test_results_exceptions_and_concurrency() -> None:
    pool = BlockingPool(4)
    barrier = threading.Barrier(4, timeout=5)

    def meet(i: int) -> int:
        barrier.wait()  # only passes if four calls run at once, in four threads
        return i * 2

    def boom() -> None:
        raise ValueError("no")

    async def main() -> None:
        assert await asyncio.gather(*(pool.run(meet, i) for i in range(4))) == [0, 2, 4, 6]
        with pytest.raises(ValueError, match="no"):
            await pool.run(boom)
        assert await pool.run(sum, [1, 2, 3]) == 6

    try:
        asyncio.run(main())
        assert pool._threads == 4
    finally:
        pool.shutdown()


def test_cancelled_waiter_does_not_break_the_pool() -> None:
    pool = BlockingPool(1)
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.1)
        done.set()
        return "late"

    async def main() -> None:
        task = asyncio.ensure_future(pool.run(slow))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await pool.run(str, 5) == "5"  # queued behind the cancelled call, then run
        assert done.is_set()

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_threads_are_made_only_when_all_are_busy() -> None:
    pool = BlockingPool(8)

    async def main() -> None:
        for _ in range(50):
            await pool.run(len, "x")  # one at a time: one thread does

    try:
        asyncio.run(main())
        assert pool._threads == 1
    finally:
        pool.shutdown()
