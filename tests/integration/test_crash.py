"""kill -9 at random moments while 200 messages are submitted concurrently (bounded).

Afterwards every message that got a 250 is in the Maildir exactly once, and no message at all
is there twice. Clients do not retry here, so each tag was sent once.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import socketserver
import threading
import time
from collections import Counter

from tests.conftest import Server, ServerFactory

SENDERS = 20
PER_SENDER = 10


def test_kill9_during_concurrent_submission(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test",), services=("smtp",))
    srv.add_user("alice@a.test")
    acked: set[str] = set()
    lock = threading.Lock()
    rng = random.Random(1234)
    deadline = time.monotonic() + 90

    def sender(n: int) -> None:
        for i in range(PER_SENDER):
            tag = f"m{n:02d}-{i:02d}"
            msg = f"Subject: {tag}\r\n\r\n{tag}\r\n".encode() + b"x" * rng.choice([10, 5000])
            if time.monotonic() > deadline:
                return
            try:
                with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=10) as c:
                    c.sendmail("s@remote.test", ["alice@a.test"], msg)
                with lock:
                    acked.add(tag)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the server is down; this one is not acknowledged

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    for _ in range(3):
        time.sleep(rng.uniform(0.2, 0.8))
        srv.kill9()
        srv.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    assert len(acked) >= SENDERS * PER_SENDER // 4

    def tags() -> Counter[str]:
        return Counter(
            m.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
            for m in srv.messages("alice@a.test")
        )

    end = time.monotonic() + 30
    while not acked <= set(tags()) and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(0.5)
    counts = tags()
    missing = acked - set(counts)
    assert not missing, f"acknowledged but lost: {sorted(missing)}"
    assert all(c == 1 for c in counts.values()), counts.most_common(3)
    # Messages without a 250 may or may not have made it (the crash came between fsync and
    # reply: RFC 1047's window), but never more than once.


class SinkMX:
    """A minimal SMTP server on loopback that counts the messages it accepts, by Subject."""

    def __init__(self, host: str) -> None:
        self.got: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = socketserver.ThreadingTCPServer((host, 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                out = self.wfile
                out.write(b"220 sink\r\n")
                while line := self.rfile.readline(1000):
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        out.write(b"354 go\r\n")
                        data = b""
                        while not data.endswith(b"\r\n.\r\n"):
                            chunk = self.rfile.readline(100_000)
                            if not chunk:
                                return
                            data += chunk
                        tag = data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                        with sink.lock:
                            sink.got[tag] += 1
                        out.write(b"250 ok\r\n")
                    elif verb == b"QUIT":
                        out.write(b"221 bye\r\n")
                        return
                    else:
                        out.write(b"250 ok\r\n")

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _send_under_kills(
    srv: Server, sender_address: str, sizes: tuple[int, ...], senders: int, seed: int
) -> tuple[set[str], set[str], dict[str, int]]:
    """Tagged messages to fwd@a.test from ``senders`` threads while the server or its journal
    writer is killed at random moments (``POSTROOM_PROBE_ROUNDS`` times, default 4): the tags
    that got a 250, those refused with a 4yz reply (to be sent again: never to be delivered),
    and the kills."""
    rounds = int(os.environ.get("POSTROOM_PROBE_ROUNDS", "4"))
    acked: set[str] = set()
    refused: set[str] = set()
    lock = threading.Lock()
    rng = random.Random(seed)
    deadline = time.monotonic() + 30 + 15 * rounds
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            tag = f"m{n:02d}-{i:04d}"
            i += 1
            size = rng.choice(sizes)
            msg = f"Subject: {tag}\r\n\r\n{tag}\r\n".encode() + b"x" * size + b"\r\n"
            try:
                with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=10) as c:
                    c.sendmail(sender_address, ["fwd@a.test"], msg)
                with lock:
                    acked.add(tag)
            except smtplib.SMTPDataError as exc:  # the message refused (a writer killed: 452)
                if 400 <= exc.smtp_code < 500:  # (not a 421 to QUIT after its 250)
                    with lock:
                        refused.add(tag)
                time.sleep(0.05)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    kills = {"server": 0, "writer": 0}
    for _ in range(rounds):
        time.sleep(rng.uniform(0.3, 1.5))
        assert srv.proc is not None
        # The supervisor's child is the worker; the worker's, its Maildir writer.
        writers = [w for worker in _children(srv.proc.pid) for w in _children(worker)]
        if writers and rng.random() < 0.4:
            os.kill(writers[0], signal.SIGKILL)  # the writer alone; the server goes on
            kills["writer"] += 1
            continue
        srv.kill9()
        kills["server"] += 1
        srv.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return acked, refused, kills


def _subjects(srv: Server, user: str) -> Counter[str]:
    """The messages in ``user``'s Maildir, by Subject."""
    return Counter(m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in srv.messages(user))


def test_kill9_of_server_and_writer_with_local_and_remote_recipients(
    server_factory: ServerFactory,
) -> None:
    """Mail to an alias that reaches a local user and a remote one (a sink MX on loopback),
    while the server or its journal writer is killed at random moments: every message that got
    a 250 is in the Maildir exactly once and reached the sink (more than once only if a kill
    came between the sink's 250 and recording it)."""
    from tests.dnszone import LoopbackDNS

    sink = SinkMX("127.0.0.3")
    zone = LoopbackDNS()
    zone.mx("b.test", 10, "mx.b.test")
    zone.a("mx.b.test", "127.0.0.3")
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml=(
            f'[dns]\nnameservers = ["{zone.nameserver}"]\n'
            f'[delivery]\nport = {sink.port}\nretry_intervals = ["1s"]\n'
        ),
    )
    try:
        srv.add_user("alice@a.test")
        srv.cli("alias", "add", "fwd@a.test", "alice@a.test", "bob@b.test")
        acked, refused, kills = _send_under_kills(
            srv, "s@remote.test", (10, 5000, 200_000), 8, 4321
        )
        srv.cli("queue", "flush")  # what was cut short waits for no retry interval

        end = time.monotonic() + 60
        while time.monotonic() < end and not (
            acked <= set(_subjects(srv, "alice@a.test")) and acked <= set(sink.got)
        ):
            time.sleep(0.2)
        time.sleep(0.5)
        local, remote = _subjects(srv, "alice@a.test"), Counter(sink.got)
        print(
            f"probe: {len(acked)} acknowledged; kills {kills}; local copies {sum(local.values())}"
            f" ({len(local)} distinct); relayed {sum(remote.values())} ({len(remote)} distinct,"
            f" {sum(c - 1 for c in remote.values())} repeated); {len(refused)} refused"
        )
        if os.environ.get("POSTROOM_PROBE_DEBUG"):
            print("repeated:", [t for t, c in remote.items() if c > 1][:10], srv.log)
        assert len(acked) >= 50
        assert not acked - set(local), f"lost locally: {sorted(acked - set(local))[:5]}"
        assert all(c == 1 for c in local.values()), local.most_common(3)
        assert not refused & set(local), f"refused, delivered: {sorted(refused & set(local))[:5]}"
        assert not acked - set(remote), f"never relayed: {sorted(acked - set(remote))[:5]}"
        # Repeats at the sink (printed above) are allowed only for messages whose sink 250
        # came just before a kill: the crash lost the record of it.
    finally:
        sink.close()
        zone.stop()


def test_kill9_while_bouncing_reports_each_failure_once(server_factory: ServerFactory) -> None:
    """Mail to an alias of a local user and an address whose domain does not exist (an
    immediate 5.1.2 bounce to the local sender), while the server or its writer is killed at
    random moments: every message that got a 250 is in the Maildir once and bounced to its
    sender once. (The DSN is decided and stored with the outcome before it is queued, and
    started only after the outcome is recorded: no kill can make it twice.)"""
    from tests.dnszone import LoopbackDNS

    zone = LoopbackDNS()  # no zone for nowhere.test: NXDOMAIN
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml=f'[dns]\nnameservers = ["{zone.nameserver}"]\n',
    )
    try:
        srv.add_user("alice@a.test")
        srv.add_user("carol@a.test")
        srv.cli("alias", "add", "fwd@a.test", "alice@a.test", "x@nowhere.test")
        acked, refused, kills = _send_under_kills(srv, "carol@a.test", (0,), 6, 2468)

        def reports() -> Counter[str]:
            # The DSN quotes the original's header section, its Subject with it.
            found: Counter[str] = Counter()
            for m in srv.messages("carol@a.test"):
                found.update(t.decode() for t in set(re.findall(rb"Subject: (m\d\d-\d{4})", m)))
            return found

        end = time.monotonic() + 60  # a DSN cut short by a kill waits for no retry interval
        while time.monotonic() < end and not (
            acked <= set(_subjects(srv, "alice@a.test")) and acked <= set(reports())
        ):
            srv.cli("queue", "flush")
            time.sleep(0.5)
        time.sleep(0.5)
        local, bounced = _subjects(srv, "alice@a.test"), reports()
        print(
            f"probe: {len(acked)} acknowledged; kills {kills}; local copies"
            f" {sum(local.values())} ({len(local)} distinct); DSNs {sum(bounced.values())}"
            f" ({len(bounced)} distinct)"
        )
        assert len(acked) >= 50
        assert not acked - set(local), f"lost locally: {sorted(acked - set(local))[:5]}"
        assert all(c == 1 for c in local.values()), local.most_common(3)
        assert not refused & set(local), f"refused, delivered: {sorted(refused & set(local))[:5]}"
        assert not acked - set(bounced), f"never reported: {sorted(acked - set(bounced))[:5]}"
        assert all(c == 1 for c in bounced.values()), bounced.most_common(3)
    finally:
        zone.stop()
