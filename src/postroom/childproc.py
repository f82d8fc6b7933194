"""Helper child processes that a server process talks to over a socketpair.

The Maildir writer and the DKIM helper are the same kind of child: ``python -m MODULE FD
PARENT_PID ARGS...``, a fresh interpreter (no fork of a threaded server) started with the
server's interpreter options, holding its end of a socketpair as FD. It says it is ready with a
first answer of id ``READY`` and exits when the server's end of the socket closes; the server
reads its answers like any other connection. This module is the plumbing they share: starting
the child, the server's side of the connection (waiting jobs, readiness, loss), closing it. The
wire formats are each child's own. Security note: a child started with ``-I`` by a server
started with ``-I`` imports this same postroom, never one found through ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

READY = 0  # the id of a child's first answer: it has started; jobs count from 1
R = TypeVar("R")
P = TypeVar("P", bound="Answers[Any]")


def interpreter_flags() -> list[str]:
    """This interpreter's options that decide what a child Python imports and how (``-I``,
    ``-E``, ``-s``, ``-S``, ``-P``, ``-O``, ``-B``, ``-X``): a server started with ``-I``
    must not get a child that honours ``PYTHONPATH`` and imports another postroom."""
    flags = sys.flags
    args = ["-I"] if flags.isolated else []
    if not flags.isolated:
        args += ["-E"] if flags.ignore_environment else []
        args += ["-s"] if flags.no_user_site else []
        args += ["-P"] if flags.safe_path else []
    args += ["-S"] if flags.no_site else []
    args += ["-" + "O" * flags.optimize] if flags.optimize else []
    args += ["-B"] if flags.dont_write_bytecode else []
    for key, value in sys._xoptions.items():
        args += ["-X", key if value is True else f"{key}={value}"]
    return args


def run_behind_server() -> None:
    """Called first by a child: schedule it ``SCHED_BATCH`` (Linux), so that a job the server
    writes never preempts the server on its CPU. A batch task does not preempt at wake-up; it
    runs at once on an idle CPU, else when the server waits (for it, or for the network).
    Preempted at each job, the server paid a context switch per write; measured on 2 vCPUs
    with 20 SMTP sessions, 1 KiB signed mail with every check on went from 793 to 891 msg/s
    and 100 KiB mail from 1.03x to 1.22x Postfix. Threads the child starts later inherit it."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: nothing to do
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def ignore_signals() -> None:
    """Called first by a child too: the server decides when it stops (SIGINT, SIGTERM), and a
    SIGHUP meant for the server (``pkill -HUP postroom``) must not kill it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def start(module: str, args: Sequence[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start ``python -m module FD PARENT_PID *args``: the child and the server's end of the
    socketpair (to be given to :func:`connect`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, *interpreter_flags(), "-m", module]
    argv += [str(theirs.fileno()), str(os.getpid()), *args]
    # Not the workers' shared metrics: a child's own values (zeros) would be aggregated with
    # theirs (postroom_start_time_seconds, a minimum, fell to 0).
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with theirs:
        try:
            proc = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env
            )
        except BaseException:
            ours.close()
            raise
    return proc, ours


async def connect(sock: socket.socket, protocol: Callable[[], P]) -> P:
    """The connection to a child just started, once it has said it is ready."""
    loop = asyncio.get_running_loop()
    _transport, answers = await loop.create_unix_connection(protocol, sock=sock)
    await answers.ready
    return answers


async def finish(answers: Answers[R] | None, timeout: float) -> None:
    """Close the server's end (the child finishes what it was sent, then exits), waiting at
    most ``timeout`` seconds for the child to close its end."""
    if answers is not None and not answers.closed.done():
        answers.transport.write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(answers.closed), timeout)
        answers.transport.close()


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill the child if it still runs (its socket is gone: it cannot be told anything)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


class Answers(asyncio.Protocol, Generic[R]):
    """The server's side of the connection to a child: a subclass reads the answers in
    ``data_received`` and hands each to :meth:`settle`."""

    process = "helper"  # the child's name in the errors of jobs it left unanswered

    def __init__(self) -> None:
        self.waiters: dict[int, asyncio.Future[R]] = {}
        self._next_id = 0
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # the child's first answer
        # Done once the connection is lost: the child is gone, a new one must be started.
        self.closed: asyncio.Future[None] = loop.create_future()
        self.answered_at = time.monotonic()  # of the last answer: the child is still working

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass

    def submit(self, frame: Callable[[int], list[bytes]]) -> tuple[int, asyncio.Future[R]]:
        """Send one job, ``frame(job_id)`` being its octets: its id, and what waits for its
        answer (failed with OSError if the child goes away first)."""
        self._next_id = job_id = self._next_id % 0xFFFFFFFF + 1  # 0 is READY's
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.waiters[job_id] = waiter
        self.transport.writelines(frame(job_id))
        return job_id, waiter

    def settle(self, job_id: int, result: R) -> None:
        """An answer has come: the child is ready (``READY``), or a job is done."""
        self.answered_at = time.monotonic()
        if job_id == READY and not self.ready.done():
            self.ready.set_result(None)
        waiter = self.waiters.pop(job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(OSError(errno.EIO, f"the {self.process} process exited"))
        self.waiters.clear()
        if not self.ready.done():
            self.ready.set_exception(
                OSError(errno.EIO, f"the {self.process} process exited at start")
            )
        if not self.closed.done():
            self.closed.set_result(None)
