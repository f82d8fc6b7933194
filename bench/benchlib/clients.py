"""Load generators: Postfix's smtp-source, and the Python SMTP-submission and POP3 clients.

The Python clients run in separate processes (one per connection stream) so the client side is
not limited by one GIL; all workers are forked first and start together on one event, and the
clock runs from that event until the last worker is done. The same code drives every server.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

from benchlib.proc import BenchError
from benchlib.servers import Addr

CTX = mp.get_context("fork")
SENDER_HELO = "client.bench.test"


def smtp_source(
    addr: Addr,
    rcpt: str,
    messages: int,
    size: int,
    sessions: int,
    keep_connection: bool,
    timeout: float,
    message_file: Path | None = None,
    sender: str = "sender@src.test",
) -> float:
    """Run smtp-source; returns its wall time in seconds. Any non-2xx reply is a failure.
    With ``message_file`` that message is sent (``-F``) instead of one made of ``size``."""
    cmd = [
        "smtp-source",
        "-4",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-f",
        sender,
        "-t",
        rcpt,
        "-M",
        SENDER_HELO,
    ]
    if keep_connection:
        cmd.append("-d")
    if message_file is not None:
        cmd += ["-F", str(message_file)]
    else:
        cmd += ["-l", str(size), "-S", "bench"]
    cmd.append(str(addr))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(
            f"smtp-source failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return elapsed


def run_workers(
    target: Callable[..., None], jobs: list[tuple[object, ...]], timeout: float
) -> tuple[float, list[object]]:
    """Fork one process per job, release them together, wait (bounded); (seconds, results)."""
    go = CTX.Event()
    results: mp.Queue[object] = CTX.Queue()
    procs = [CTX.Process(target=target, args=(go, results, *job), daemon=True) for job in jobs]
    for proc in procs:
        proc.start()
    start = time.perf_counter()
    go.set()
    collected: list[object] = []
    try:
        for _ in procs:
            remaining = max(0.1, timeout - (time.perf_counter() - start))
            collected.append(results.get(timeout=remaining))
    except queue.Empty:
        raise BenchError(f"workers did not finish within {timeout:.0f}s") from None
    finally:
        elapsed = time.perf_counter() - start
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in collected if isinstance(r, str)]
    if errors:
        raise BenchError(errors[0])
    return elapsed, collected


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- SMTP submission (STARTTLS + AUTH) ------------------------------------------------------------


@dataclass(frozen=True)
class SubmissionJob:
    addr: Addr
    user: str
    password: str
    rcpt: str  # one or more, comma-separated
    messages: int
    per_connection: int
    body: bytes


def submission_worker(go: Event, results: mp.Queue[object], job: SubmissionJob) -> None:
    """Send ``job.messages`` through STARTTLS+AUTH sessions of ``per_connection`` messages."""
    go.wait()
    try:
        sent = 0
        context = _client_tls()
        while sent < job.messages:
            with smtplib.SMTP(
                job.addr.host, job.addr.port, local_hostname=SENDER_HELO, timeout=60
            ) as client:
                client.starttls(context=context)
                client.login(job.user, job.password)
                for _ in range(min(job.per_connection, job.messages - sent)):
                    client.sendmail(job.user, job.rcpt.split(","), job.body)
                    sent += 1
        results.put(sent)
    except Exception as exc:
        results.put(f"submission to {job.addr}: {type(exc).__name__}: {exc}")


def submission(job: SubmissionJob, workers: int, timeout: float) -> float:
    """Split ``job.messages`` over ``workers`` processes; returns wall seconds."""
    share = [
        job.messages // workers + (1 if i < job.messages % workers else 0) for i in range(workers)
    ]
    jobs: list[tuple[object, ...]] = [
        (
            SubmissionJob(
                job.addr, job.user, job.password, job.rcpt, n, job.per_connection, job.body
            ),
        )
        for n in share
        if n
    ]
    elapsed, _ = run_workers(submission_worker, jobs, timeout)
    return elapsed


def make_submission_body(sender: str, rcpt: str, size: int) -> bytes:
    header = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


# --- POP3 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pop3Job:
    addr: Addr
    user: str
    password: str
    stls: bool
    expect: int


class Pop3Client:
    """A lock-step POP3 client over a raw socket: one command, then its whole reply.

    Its own cost per message is kept small, since in lock-step it adds to every server's time
    per message alike. The socket blocks, with the time-out kept by the kernel
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``) rather than by Python, which would make a ``poll`` before
    every call; replies are read into one reused buffer, since ``recv(n)`` allocates ``n``
    octets each time, and a large ``n`` costs an ``mmap``, ``mremap`` and ``munmap`` per call.
    """

    def __init__(self, addr: Addr) -> None:
        sock = socket.create_connection((addr.host, addr.port), timeout=60)
        sock.settimeout(None)
        limit = struct.pack("ll", 60, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.chunk = bytearray(1 << 16)
        self.view = memoryview(self.chunk)
        self.buf = bytearray()
        self.single()  # greeting

    def _fill(self) -> None:
        try:
            got = self.sock.recv_into(self.chunk)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise BenchError("POP3 server sent nothing for 60 s") from None
        if not got:
            raise BenchError("POP3 server closed the connection")
        self.buf += self.view[:got]

    def single(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        if not line.startswith(b"+OK"):
            raise BenchError(f"POP3: {line[:200]!r}")
        return line

    def multi(self) -> bytes:
        """Read a multi-line reply; returns its body, still dot-stuffed, terminator excluded."""
        self.single()
        if self.buf.startswith(b".\r\n"):
            del self.buf[:3]
            return b""
        start = 0
        while (end := self.buf.find(b"\r\n.\r\n", start)) < 0:
            start = max(0, len(self.buf) - 4)
            self._fill()
        body = bytes(self.buf[: end + 2])
        del self.buf[: end + 5]
        return body

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.single()

    def command_multi(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.multi()

    def starttls(self) -> None:
        self.command("STLS")
        if self.buf:
            raise BenchError("POP3: data after the STLS reply")
        self.sock = _client_tls().wrap_socket(self.sock)


def pop3_session(job: Pop3Job) -> tuple[int, int]:
    """LIST, then RETR+DELE every message, QUIT; returns (messages, octets retrieved)."""
    client = Pop3Client(job.addr)
    if job.stls:
        client.starttls()
    client.command(f"USER {job.user}")
    client.command(f"PASS {job.password}")
    listing = client.command_multi("LIST").count(b"\r\n")
    if listing != job.expect:
        raise BenchError(f"POP3 {job.user}: LIST shows {listing}, expected {job.expect}")
    octets = 0
    for number in range(1, listing + 1):
        octets += len(client.command_multi(f"RETR {number}"))
        client.command(f"DELE {number}")
    client.command("QUIT")
    client.sock.close()
    return listing, octets


def pop3_worker(go: Event, results: mp.Queue[object], job: Pop3Job) -> None:
    go.wait()
    try:
        results.put(pop3_session(job))
    except Exception as exc:
        results.put(f"POP3 {job.user}@{job.addr}: {type(exc).__name__}: {exc}")


def pop3(jobs: list[Pop3Job], timeout: float) -> tuple[float, int, int]:
    """Run one client per job in parallel; returns (seconds, messages, octets)."""
    elapsed, results = run_workers(pop3_worker, [(job,) for job in jobs], timeout)
    messages = sum(r[0] for r in results if isinstance(r, tuple))
    octets = sum(r[1] for r in results if isinstance(r, tuple))
    return elapsed, messages, octets
