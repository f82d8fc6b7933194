"""``workers = 2``: both processes serve, spooled mail reaches the primary's queue runner,
a kill -9 of the server (its supervisor) leaves no worker behind holding the ports, and a
worker killed on its own is started again."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import threading

import pytest

from tests.conftest import ServerFactory, first_line, wait_greeting, wait_until
from tests.dnszone import LoopbackDNS


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def is_writer(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"postroom.storage.local.maildir_writer" in f.read()


def test_two_workers(server_factory: ServerFactory) -> None:
    dns = LoopbackDNS()  # knows no domain: remote mail bounces with 5.1.2
    try:
        srv = server_factory(
            domains=("a.test",),
            services=("smtp", "submission"),
            extra_toml=f'workers = 2\n[dns]\nnameservers = ["{dns.nameserver}"]\n',
        )
        srv.add_user("alice@a.test", "pw")
        assert srv.proc is not None
        workers = children_of(srv.proc.pid)  # under the supervisor
        assert len(workers) == 2 and not any(is_writer(p) for p in workers)
        writers = [p for w in workers for p in children_of(w) if is_writer(p)]
        assert len(writers) == 2  # each worker has its Maildir writer process

        def send(i: int) -> None:
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
                c.sendmail(
                    "x@r.test", ["alice@a.test"], f"Subject: local {i}\r\n\r\nx\r\n".encode()
                )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(srv.wait_messages("alice@a.test", 40)) == 40

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for i in range(6):  # several connections: both workers spool some of them
            with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
                c.starttls(context=ctx)
                c.login("alice@a.test", "pw")
                c.sendmail(
                    "alice@a.test",
                    ["bob@nowhere.test"],
                    f"Subject: remote {i}\r\n\r\nx\r\n".encode(),
                )
        msgs = srv.wait_messages("alice@a.test", 46, timeout=30)
        assert len(msgs) == 46  # six bounces came back through the primary's runner
        assert sum(b"Status: 5.1.2" in m for m in msgs) == 6

        srv.kill9()
        gone = workers + writers  # and nothing of the old server stays behind
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in gone), 5)
        srv.start()
        send(99)
        assert len(srv.wait_messages("alice@a.test", 47)) == 47
        assert srv.stop() == 0
    finally:
        dns.stop()


def test_pin_cpus_puts_the_loop_and_its_writer_on_cpus_of_their_own(
    server_factory: ServerFactory,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pin_cpus needs two CPUs; this machine has one")
    srv = server_factory(domains=("a.test",), services=("smtp",), extra_toml="pin_cpus = true\n")
    srv.add_user("alice@a.test", "pw")
    assert srv.proc is not None
    (worker,) = children_of(srv.proc.pid)
    (writer,) = [p for p in children_of(worker) if is_writer(p)]
    assert os.sched_getaffinity(worker) == {cpus[0]}
    assert os.sched_getaffinity(writer) == {cpus[1]}
    for tid in os.listdir(f"/proc/{writer}/task"):  # its threads too (the syncer)
        assert os.sched_getaffinity(int(tid)) == {cpus[1]}
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: pinned\r\n\r\nx\r\n")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1


def worker_pids(log: str, index: int) -> list[int]:
    return [int(m) for m in re.findall(rf"worker {index} started, pid (\d+)", log)]


def test_a_killed_worker_is_started_again(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test",), services=("smtp",), extra_toml="workers = 2\n")
    srv.add_user("alice@a.test", "pw")

    def send_all(count: int) -> None:
        for i in range(count):  # new connections: the kernel spreads them over both sockets
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
                c.sendmail("x@r.test", ["alice@a.test"], f"Subject: {i}\r\n\r\nx\r\n".encode())

    for index in (1, 0):  # a secondary, then the primary (it recovers the queue again)
        # Killed before it was first ready, a worker stops the server (a start-up error), and
        # "postroom: ready" is the primary's: the secondary may still be starting.
        wait_until(lambda: f"worker {index} ready" in srv.log.read_text(), 15)  # noqa: B023
        (pid,) = worker_pids(srv.log.read_text(), index)[-1:]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(srv.log.read_text(), index)) >= 2, 15)  # noqa: B023
        assert "starting it again" in srv.log.read_text()
        before = len(srv.messages("alice@a.test"))
        send_all(20)
        assert len(srv.wait_messages("alice@a.test", before + 20)) == before + 20
    assert srv.stop() == 0


def test_a_restarted_primary_leaves_the_other_workers_body_files(
    server_factory: ServerFactory,
) -> None:
    """The primary started again ran the start's clean-up of body files no journal names,
    and took the living secondary's spare files with them: its next large messages (a body
    file each) got 452 4.3.1, logged as a full disk."""
    srv = server_factory(domains=("a.test",), services=("smtp",), extra_toml="workers = 2\n")
    srv.add_user("alice@a.test", "pw")
    wait_until(lambda: "worker 1 ready" in srv.log.read_text(), 15)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200  # 200 KB: a body file

    def send_all(count: int) -> None:
        for _ in range(count):  # new connections: the kernel spreads them over both workers
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
                c.sendmail("x@r.test", ["alice@a.test"], big)  # raises on a 452

    send_all(12)  # each worker has spare body files made now
    (pid,) = worker_pids(srv.log.read_text(), 0)[-1:]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(worker_pids(srv.log.read_text(), 0)) >= 2, 15)
    wait_until(lambda: srv.log.read_text().count("worker 0 ready") >= 2, 15)
    send_all(12)
    assert len(srv.wait_messages("alice@a.test", 24)) == 24
    assert srv.stop() == 0


def test_max_connections_holds_across_workers(server_factory: ServerFactory) -> None:
    # Each worker had max_connections / workers, rounded up: 1 let in two.
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml="workers = 2\n[limits]\nmax_connections = 1\n",
    )
    held = [socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) for _ in range(6)]
    try:
        answers = [first_line(s) for s in held]
        assert sum(a.startswith(b"220 ") for a in answers) == 1, answers
    finally:
        for s in held:
            s.close()


def test_per_ip_limits_hold_across_workers(server_factory: ServerFactory) -> None:
    # They were counted by each worker: a client got `workers` x the limit.
    srv = server_factory(
        domains=("a.test",),
        services=("smtp", "pop3"),
        extra_toml="workers = 2\n[limits]\nmax_connections_per_ip = 3\nper_ip_exempt = []\n"
        '[auth]\nallow_plaintext = true\nlockout_failures = 6\nfailure_delay = "0.01s"\n',
    )
    srv.add_user("alice@a.test", "right-password")
    held = [socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) for _ in range(10)]
    try:
        answers = [first_line(s) for s in held]
        assert sum(a.startswith(b"220 ") for a in answers) == 3, answers
        assert sum(a.startswith(b"421 ") for a in answers) == 7, answers
    finally:
        for s in held:
            s.close()
    wait_greeting(srv.host, srv.ports["smtp"])  # the workers see the closes

    def login(password: str) -> bytes:
        with socket.create_connection((srv.host, srv.ports["pop3"]), timeout=10) as s:
            first_line(s)
            s.sendall(f"USER alice@a.test\r\nPASS {password}\r\n".encode())
            out = b""
            while out.count(b"\r\n") < 2:
                chunk = s.recv(512)
                if not chunk:
                    break
                out += chunk
            return out.split(b"\r\n")[1]

    for i in range(6):  # new connections each: spread over both workers
        assert login(f"guess{i}").startswith(b"-ERR [AUTH]")
    for _ in range(6):  # locked out on every worker, even with the right password
        assert login("right-password").startswith(b"-ERR [SYS/TEMP]")


class _HoldingMX:
    """An MX that reads each message to its final dot and answers 250 only once ``release``
    is set; a session whose client died meanwhile delivers nothing."""

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, 0))
        self.release = threading.Event()
        self.dots = 0
        self.delivered: set[str] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            try:
                conn.sendall(b"220 mx.far.test ESMTP\r\n")
                while line := f.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-mx.far.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        subject = ""
                        while (data := f.readline()) and data != b".\r\n":
                            if data.startswith(b"Subject: "):
                                subject = data[9:].strip().decode()
                        self.dots += 1
                        self.release.wait(30)
                        try:  # a client that died meanwhile has closed its end: no delivery
                            if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                                return
                        except BlockingIOError:
                            pass
                        conn.sendall(b"250 2.0.0 queued\r\n")
                        self.delivered.add(subject)
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 OK\r\n")
            except OSError:
                return


def test_a_dead_secondarys_messages_are_retried_without_a_restart(
    server_factory: ServerFactory,
) -> None:
    """A secondary worker killed in the middle of its first attempts: the replay of its
    journal by its successor parked them where the primary, which owns the retries, never
    looked until the next start of the server (and queue flush did not reach them)."""
    mx = _HoldingMX("127.0.0.177")
    dns = LoopbackDNS()
    try:
        dns.mx("far.test", 10, "mx.far.test")
        dns.a("mx.far.test", "127.0.0.177")
        srv = server_factory(
            domains=("a.test",),
            services=("smtp",),
            extra_toml=(
                f'workers = 2\n[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
                f"[delivery]\nport = {mx.listener.getsockname()[1]}\n"
                # All twelve are held at once: the kernel may give one worker more than the
                # default 10 per destination (the rest then waited for a release).
                'retry_intervals = ["1s"]\nmax_per_destination = 20\n'
                "[auth]\nchecks = false\n"
            ),
        )
        srv.cli("alias", "add", "fwd@a.test", "bob@far.test")
        wait_until(lambda: "worker 1 ready" in srv.log.read_text(), 15)
        subjects = [f"m{i}" for i in range(12)]
        for s in subjects:  # new connections: the kernel spreads them over both workers
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
                c.sendmail("x@r.test", ["fwd@a.test"], f"Subject: {s}\r\n\r\nx\r\n".encode())
        wait_until(lambda: mx.dots >= len(subjects), 20, "every message at the MX")
        (pid,) = worker_pids(srv.log.read_text(), 1)[-1:]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(srv.log.read_text(), 1)) >= 2, 15)
        mx.release.set()
        wait_until(lambda: mx.delivered >= set(subjects), 30, "every message delivered")
        assert srv.stop() == 0
    finally:
        mx.listener.close()
        dns.stop()
