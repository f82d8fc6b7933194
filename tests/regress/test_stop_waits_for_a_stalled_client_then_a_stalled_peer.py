"""On SIGTERM a worker waited up to 8 s for sessions still receiving a message, and only then
up to 5 s more for deliveries in flight: a client dripping its DATA plus a remote MX that
holds its reply (a tarpit) took 13 s, past the supervisor's grace, so the workers were killed
and ``postroom serve`` did not exit 0 within 10 s. Both waits now share one deadline; the
delivery cut short stays queued.

And the deliveries were cut off after 5 s, also one whose final dot was already out and
whose host was about to answer: the host had the message, postroom did not record it, and
sent it again after the restart (RFC 5321 §6.1 allows that only for a reply that never
comes). A delivery waiting for the reply to its dot is now waited for until the deadline."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Server, ServerFactory, free_port, wait_until
from tests.dnszone import LoopbackDNS

SERVER_IP, TARPIT_IP = "127.0.0.161", "127.0.0.162"


class Tarpit:
    """An MX that takes the whole message and then answers the final dot after
    ``reply_after`` seconds, or never."""

    def __init__(self, port: int, reply_after: float | None = None) -> None:
        self.listener = socket.create_server((TARPIT_IP, port))
        self.reply_after = reply_after
        self.go_on_after = 0.0  # seconds before the 354
        self.at_data = threading.Event()
        self.got_data = threading.Event()
        self.messages = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conns.append(conn)
        f = conn.makefile("rb")
        conn.sendall(b"220 tarpit.test ESMTP\r\n")
        while line := f.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-tarpit.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                self.at_data.set()
                time.sleep(self.go_on_after)
                conn.sendall(b"354 go on\r\n")
                while (data := f.readline()) and data != b".\r\n":
                    pass
                if not data:
                    return  # closed without the final dot: no message
                self.got_data.set()
                if self.reply_after is None:
                    continue  # no reply, ever
                time.sleep(self.reply_after)
                self.messages += 1
                conn.sendall(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                return
            else:
                conn.sendall(b"250 OK\r\n")

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def tarpit() -> Iterator[tuple[Tarpit, LoopbackDNS]]:
    zone = LoopbackDNS()
    zone.mx("tarpit.test", 10, "mx.tarpit.test")
    zone.a("mx.tarpit.test", TARPIT_IP)
    pit = Tarpit(free_port(TARPIT_IP))
    yield pit, zone
    pit.close()
    zone.stop()


def _relay_to(
    server_factory: ServerFactory, pit: Tarpit, zone: LoopbackDNS, wait: bool = True
) -> Server:
    """A server that has relayed one message to ``pit``, which holds its final dot now
    (``wait``: the caller waits for what it wants instead)."""
    srv = server_factory(
        domains=("a.test",),
        host=SERVER_IP,
        services=("smtp",),
        extra_toml=(
            f'[dns]\nnameservers = ["{zone.nameserver}"]\ntimeout = "3s"\n'
            f"[delivery]\nport = {pit.listener.getsockname()[1]}\n"
            "[auth]\nallow_plaintext = true\nchecks = false\ndkim_sign = false"
        ),
    )
    srv.add_user("alice@a.test", "pw")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.login("alice@a.test", "pw")
        c.sendmail("alice@a.test", ["bob@tarpit.test"], b"Subject: to the pit\r\n\r\nx\r\n")
    assert not wait or pit.got_data.wait(20), "the delivery did not reach the tarpit"
    return srv


@contextlib.contextmanager
def dripping_client(srv: Server) -> Iterator[None]:
    """A client in DATA that sends one octet every half second while the block runs."""
    drip = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20)
    drip.sendall(b"EHLO d\r\nMAIL FROM:<d@x.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n")
    wait_until(lambda: b"354" in drip.recv(4096), what="354")
    stop = threading.Event()

    def dripping() -> None:
        while not stop.is_set():
            try:
                drip.sendall(b"x")
            except OSError:
                return
            stop.wait(0.5)

    threading.Thread(target=dripping, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        drip.close()


def test_sigterm_with_a_dripping_client_and_a_tarpit_peer_exits_0_within_10_s(
    server_factory: ServerFactory, tarpit: tuple[Tarpit, LoopbackDNS]
) -> None:
    pit, zone = tarpit
    srv = _relay_to(server_factory, pit, zone)
    with dripping_client(srv):
        time.sleep(1)
        t0 = time.monotonic()
        code = srv.stop(timeout=20)
        elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 10, (code, elapsed)
    # The delivery cut short is still queued, for the next start, and the log says so.
    assert "bob@tarpit.test" in srv.cli("queue", "list").stdout
    assert "stopping: 1 delivery attempt(s) cut short" in srv.log.read_text()


def test_sigterm_waits_for_the_reply_to_a_final_dot_already_sent(
    server_factory: ServerFactory, tarpit: tuple[Tarpit, LoopbackDNS]
) -> None:
    pit, zone = tarpit
    pit.reply_after = 6.5  # past the 5 s deliveries get, within the 8 s deadline
    srv = _relay_to(server_factory, pit, zone)
    t0 = time.monotonic()
    code = srv.stop(timeout=20)
    elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 10, (code, elapsed)
    assert pit.messages == 1
    # The reply was waited for and recorded: nothing is left to send again.
    assert srv.cli("queue", "list").stdout == ""


def test_sigterm_before_the_354_sends_no_final_dot(
    server_factory: ServerFactory, tarpit: tuple[Tarpit, LoopbackDNS]
) -> None:
    """A stop that came while a delivery waited for its 354 let it send the message and its
    dot seconds later, then left before the reply: the host had it, and got it again after
    the restart. A delivery that has not sent its dot when the stop begins sends none."""
    pit, zone = tarpit
    pit.go_on_after, pit.reply_after = 3.0, 6.0
    srv = _relay_to(server_factory, pit, zone, wait=False)
    assert pit.at_data.wait(20), "the delivery did not reach DATA"
    code = srv.stop(timeout=20)
    assert code == 0
    assert not pit.got_data.wait(2) and pit.messages == 0
    assert "bob@tarpit.test" in srv.cli("queue", "list").stdout  # for the next start


def test_a_client_the_stop_waits_for_lets_no_final_dot_out(
    server_factory: ServerFactory, tarpit: tuple[Tarpit, LoopbackDNS]
) -> None:
    """While the stop waited (up to 8 s) for a client still sending its message, the queue
    went on as if no stop had begun: a delivery waiting for its 354 sent the message and its
    dot, the server left before the host's reply, and the restart sent it again. The stop
    holds every final dot back from its first moment."""
    pit, zone = tarpit
    pit.go_on_after, pit.reply_after = 2.0, 6.0
    srv = _relay_to(server_factory, pit, zone, wait=False)
    assert pit.at_data.wait(20), "the delivery did not reach DATA"
    with dripping_client(srv):
        code = srv.stop(timeout=20)
    assert code == 0
    assert not pit.got_data.is_set() and pit.messages == 0
    assert "bob@tarpit.test" in srv.cli("queue", "list").stdout  # for the next start
