"""Blocking calls (spool fsyncs, file reads, directory scans) run in threads, off the loop.

(Maildir deliveries, the busiest file work, go to a helper process instead:
:mod:`postroom.storage.local.maildir_writer` says why.)

``loop.run_in_executor`` goes through ``concurrent.futures``: a Future guarded by a Condition,
a wrapping asyncio future and a chained callback per call, and the worker thread takes the GIL
several times to settle them. On a path with an fsync per message that was visible:
one hand-off cost ~70 µs alone and ~25 µs each under 20-way concurrency here, against ~45 µs
and ~4 µs for this pool, which hands the job over on a ``SimpleQueue`` and answers with one
``call_soon_threadsafe``. asyncio offers nothing lighter, hence this small module.

Threads are made on demand up to ``max_threads`` and live as long as the process (they are
daemon threads: a process that exits does not wait for them, and mail is only acknowledged
after the call it waits for has returned). A pool is used only in the process that made it;
forked workers make their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class BlockingPool:
    """Runs blocking functions in up to ``max_threads`` threads; ``await pool.run(f, *args)``."""

    def __init__(self, max_threads: int = 32, name: str = "postroom-io") -> None:
        self.max_threads = max_threads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        with self._lock:
            spawn = self._jobs.qsize() > self._idle and self._threads < self.max_threads
            if spawn:
                self._threads += 1
                self._idle += 1  # counted idle until it takes its first job
        if spawn:
            threading.Thread(
                target=self._work, name=f"{self.name}-{self._threads}", daemon=True
            ).start()
        return await fut

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            job = jobs.get()
            if job is None:
                return
            with lock:
                self._idle -= 1
            loop, fut, fn, args = job
            del job
            settle: Callable[[asyncio.Future[Any], Any], None] = _succeed
            try:
                value = fn(*args)
            except BaseException as exc:  # handed to the waiting coroutine
                settle, value = _fail, exc
            # Idle again before the answer wakes the loop, which may queue the next call at
            # once: it must not see every thread busy and start one more.
            with lock:
                self._idle += 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(settle, fut, value)
            del loop, fut, fn, args, value  # keep nothing alive while idle

    def shutdown(self) -> None:
        """Ask every thread to exit after the jobs already queued (for tests)."""
        with self._lock:
            count = self._threads
            self._threads = self._idle = 0
        for _ in range(count):
            self._jobs.put(None)


def _succeed(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():  # the waiter may have been cancelled
        fut.set_result(result)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
