"""DKIM signing and verification in a helper process: the event loop sends jobs over a socketpair.

Verifying a signature is mostly Python (dkimpy's parsing and canonicalization): on the MX port
it was half of the event loop's time per message, more than the SMTP session itself. A
signature (0.37 ms for RSA-2048 and Ed25519 together on a 1 KiB message here, 0.26 ms of it
RSA) lets the GIL go in ``cryptography`` 48 only for the private-key operation; on the
submission bench, signing in a thread pool (whole, or only the key operation) or inline on
the loop measured no better than this process. A child process does both without a GIL to
share, as the Maildir writer does its writes: the loop writes a job into a socket and reads
the answer like any other connection. One helper per worker process, started on first use.
It is not pinned (with ``pin_cpus`` it may use every CPU the server may): kept to the
writer's CPU, its jobs waited for that CPU, and on a loaded 2-core machine signing brought
submission down to 0.42 of its rate without signing, against 0.62 unpinned.

The child is ``python -m postroom.auth.helper FD PARENT_PID CPUS``, a fresh interpreter with the
server's interpreter options, started in the background at the first job; it says when it is
ready (an answer with id 0). It ignores SIGINT/SIGTERM, exits when the server's end of the
socket closes, and is killed by the kernel if the server dies. The server never waits for it
and never depends on it: until it is ready, and if it cannot be started or dies, jobs are done
in the server process (and the next job starts a new child). A child that answers nothing for
``TIMEOUT`` while a job waits is taken for hung (its jobs are done in order: one that waits
behind others waits as long as they take, up to ``MAX_WAIT``); the job is not done again in
the server, whose event loop it would hold as long: a signature is made there instead (its
cost is bounded), and a verification is given up (the message gets 451, see ``service``).

Wire format, little-endian: job ``<IBI`` id, kind (1 verify, 2 sign), length, then the
arguments; answer ``<IBI`` id, status (0 done, 1 failed: the payload is the error text),
length, then the result. Arguments and results are ``marshal``'ed tuples of bytes, strings
and numbers (the child is the same interpreter; marshal reads what it wrote, no pickle).
Security notes: the signing keys cross a socketpair to our own child only, as PEM, and are
never logged; the child parses each distinct key once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postroom import childproc, lifetime
from postroom.auth import dkim_sign, dkim_verify
from postroom.auth import keys as dkim_keys
from postroom.auth.lookup import Answer

log = logging.getLogger("postroom")

_FRAME = struct.Struct("<IBI")
VERIFY, SIGN = 1, 2
DONE, FAILED = 0, 1
READY = childproc.READY  # the id of the child's first answer: it has started
TIMEOUT = 60.0  # seconds: far more than any message takes; a hung child is replaced
# Seconds a job may wait for its answer, the jobs before it included: a burst of costly
# messages must not hold a reply past a client's own time-out (RFC 5321 §4.5.3.2.6: 10
# minutes after the dot), which would have it send the message again.
MAX_WAIT = 300.0
START_TIMEOUT = 30.0  # seconds for a new child to say it is ready
RETRY = 30.0  # seconds before a child that could not be started twice in a row is tried again
_READ = 1 << 20


class HelperError(Exception):
    """The helper could not do the job (not started, died, timed out): do it here."""


class HelperNotReady(HelperError):
    """The helper is being started (in the background): do this job here."""


class HelperTimedOut(HelperError):
    """The child answered nothing for ``TIMEOUT`` while the job waited, or the job waited
    ``MAX_WAIT`` in all: done here, the job would stop the server as long."""


# -- the jobs (run in the child; pure) -------------------------------------------------------


def _loads(payload: bytes) -> Any:
    """marshal's reading: only ever of what the other end of our own socketpair wrote (the
    server or its child, the same interpreter), never of anything from the network."""
    return marshal.loads(payload)  # noqa: S302 - see above


def encode_verify(message: bytes, keys: dict[str, Answer], chosen: Sequence[int]) -> bytes:
    answers = [(name, a.status, a.records, a.error) for name, a in keys.items()]
    return marshal.dumps((message, answers, list(chosen)))


def run_verify(payload: bytes) -> bytes:
    message, answers, chosen = _loads(payload)
    keys = {name: Answer(status, tuple(records), error) for name, status, records, error in answers}
    results = dkim_verify.verify(message, keys, chosen)
    return marshal.dumps(
        [(r.result, r.domain, r.selector, r.algorithm, r.b, r.reason, r.identity) for r in results]
    )


def decode_verify(payload: bytes) -> list[dkim_verify.DkimResult]:
    return [dkim_verify.DkimResult(*fields) for fields in _loads(payload)]


def encode_sign(message: bytes, keys: Sequence[dkim_sign.SigningKey], now: int) -> bytes:
    pems = [(k.domain, k.selector, _pem(k.key)) for k in keys]
    return marshal.dumps((message, pems, now))


def run_sign(payload: bytes) -> bytes:
    message, pems, now = _loads(payload)
    keys = [
        dkim_sign.SigningKey(domain, selector, dkim_keys.private_key_of(pem))
        for domain, selector, pem in pems
    ]
    return dkim_sign.sign(message, keys, now)


@lru_cache(maxsize=64)  # the server's key objects live as long as its key cache entry
def _pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


JOBS = {VERIFY: run_verify, SIGN: run_sign}


def answer(job_id: int, kind: int, payload: bytes) -> bytes:
    """Do one job; its answer frame (a failure is answered, never raised)."""
    try:
        result, status = JOBS[kind](payload), DONE
    except Exception as exc:  # hostile input must not end the helper: say so instead
        result, status = f"{type(exc).__name__}: {exc}"[:500].encode(), FAILED
    return _FRAME.pack(job_id, status, len(result)) + result


def frames(buf: bytearray) -> list[tuple[int, int, bytes]]:
    """The whole frames at the start of ``buf`` (removed from it): (id, kind or status,
    payload); an incomplete one stays for the next read."""
    out = []
    pos = 0
    while len(buf) - pos >= _FRAME.size:
        job_id, code, length = _FRAME.unpack_from(buf, pos)
        end = pos + _FRAME.size + length
        if end > len(buf):
            break
        out.append((job_id, code, bytes(buf[pos + _FRAME.size : end])))
        pos = end
    del buf[:pos]
    return out


def serve(fd: int, parent: int, cpus: set[int]) -> None:
    """The child's main loop: read what has come, do each job, answer; exit at end of input."""
    childproc.run_behind_server()
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    childproc.ignore_signals()
    lifetime.die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    sock.sendall(_FRAME.pack(READY, DONE, 0))  # imported and listening: jobs may come
    buf = bytearray()
    room = memoryview(bytearray(_READ))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server is gone
        while size := sock.recv_into(room):
            buf += room[:size]
            out = [answer(job_id, kind, payload) for job_id, kind, payload in frames(buf)]
            if out:
                sock.sendall(b"".join(out))


# -- the server's side -----------------------------------------------------------------------


class DkimHelper:
    """``await helper.verify(...)`` / ``await helper.sign(...)``; HelperError when the job
    must be done in this process instead."""

    def __init__(self, cpus: Sequence[int] = ()) -> None:
        # The CPUs the child may use: those of the server before ``pin_cpus`` kept the worker
        # to one (it would inherit that one, the event loop's); empty: as it inherits.
        self.cpus = tuple(cpus)
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: _Answers | None = None
        self._starting: asyncio.Future[None] | None = None
        self._retry_at = 0.0
        self._failed_starts = 0

    async def verify(
        self, message: bytes, keys: dict[str, Answer], chosen: Sequence[int]
    ) -> list[dkim_verify.DkimResult]:
        return decode_verify(await self._call(VERIFY, encode_verify(message, keys, chosen)))

    async def sign(self, message: bytes, keys: Sequence[dkim_sign.SigningKey], now: int) -> bytes:
        return await self._call(SIGN, encode_sign(message, keys, now))

    async def _call(self, kind: int, payload: bytes) -> bytes:
        answers = self._ready()
        if answers is None:
            raise HelperNotReady("the DKIM helper is not running yet")
        job_id, waiter = answers.submit(lambda i: [_FRAME.pack(i, kind, len(payload)), payload])
        sent = time.monotonic()
        try:
            while True:
                # The child does its jobs one after another: it is hung when it has answered
                # nothing for TIMEOUT since this job was sent, not when this job waited that
                # long behind others (a queue of costly messages timed out the cheap one
                # behind them: a forged From under p=reject came through as dkim=temperror).
                now = time.monotonic()
                if now - sent >= MAX_WAIT:
                    raise HelperTimedOut(f"the DKIM helper's jobs took {MAX_WAIT:.0f} s")
                left = min(max(sent, answers.answered_at) + TIMEOUT, sent + MAX_WAIT) - now
                if left <= 0:
                    raise TimeoutError
                with contextlib.suppress(TimeoutError):
                    status, result = await asyncio.wait_for(asyncio.shield(waiter), left)
                    break
        except TimeoutError:
            self._reap()  # hung: the next job starts a new child
            raise HelperTimedOut(f"the DKIM helper answered nothing for {TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise HelperError(str(exc)) from exc
        finally:
            answers.waiters.pop(job_id, None)
        if status != DONE:
            raise HelperError(result.decode("utf-8", "replace"))
        return result

    def _ready(self) -> _Answers | None:
        """The running child's connection; else None, and a child is started in the
        background (unless one is starting, or one could not be started lately)."""
        answers = self._answers
        if answers is not None and not answers.closed.done():
            return answers
        self._answers = None
        if self._starting is None and time.monotonic() >= self._retry_at:
            self._starting = asyncio.ensure_future(self._start())
        return None

    async def _start(self) -> None:
        try:
            self._answers = await asyncio.wait_for(self._spawn(), START_TIMEOUT)
            self._failed_starts = 0
        except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
            self._reap()
            self._failed_starts += 1
            if self._failed_starts >= 2:  # not a passing accident: wait before the next try
                self._retry_at = time.monotonic() + RETRY
            log.warning("cannot start the DKIM helper (its jobs are done in the server): %r", exc)
        finally:
            self._starting = None

    async def _spawn(self) -> _Answers:
        self._reap()
        self._proc, ours = childproc.start(__name__, [",".join(map(str, self.cpus))])
        return await childproc.connect(ours, _Answers)

    async def close(self, timeout: float = 5.0) -> None:
        """End the child (it finishes what it was sent)."""
        answers, self._answers = self._answers, None
        await childproc.finish(answers, timeout)
        self._reap()

    def _reap(self) -> None:
        """Kill the child if it still runs (its socket is gone: it cannot be told anything)."""
        if self._answers is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                self._answers.transport.close()
            self._answers = None
        childproc.kill(self._proc)
        self._proc = None


class _Answers(childproc.Answers[tuple[int, bytes]]):
    """Reads the child's answers (status, result) and settles the waiting jobs."""

    process = "DKIM helper"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for job_id, status, payload in frames(self.buf):
            self.settle(job_id, (status, payload))


def main(argv: list[str]) -> None:
    serve(int(argv[0]), int(argv[1]), {int(c) for c in argv[2].split(",") if c})


if __name__ == "__main__":
    main(sys.argv[1:])
