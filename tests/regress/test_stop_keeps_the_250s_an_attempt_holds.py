"""A stop cut off a delivery attempt after 5 s and dropped the outcomes it held in memory: one
MX had answered 250 to the final dot while another (a tarpit: another domain's MX, or the
same domain's backup MX for the recipients the first deferred) was still being waited on.
Such a 250 is stored early only when no DSN is owed for it; with NOTIFY=SUCCESS it waits for
the end of the attempt, so the restart sent the message to that host again (RFC 5321 §6.1).
A cancelled attempt now stores what it received, and owes the DSNs it decided: the host gets
the message once and the sender its success notice once."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import ServerFactory, wait_until
from tests.dnszone import LoopbackDNS
from tests.smtpsink import _Server, smtp_sink

SERVER_IP, SINK_IP, PIT_IP = "127.0.0.230", "127.0.0.231", "127.0.0.232"


class Tarpit:
    """An MX that holds every session silent (no greeting) until :meth:`release`; then it
    takes each message like the sink (``messages``)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server((PIT_IP, port))
        self.released = threading.Event()
        self.held = threading.Event()  # a session waits for its greeting
        self.messages = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        self.held.set()
        self.released.wait(60)
        f = conn.makefile("rb")
        with contextlib.suppress(OSError):
            conn.sendall(b"220 pit.test ESMTP\r\n")
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-pit.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while (data := f.readline()) and data != b".\r\n":
                        pass
                    if not data:
                        return
                    self.messages += 1
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 OK\r\n")

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def hosts() -> Iterator[tuple[_Server, Tarpit, LoopbackDNS]]:
    """A sink that answers at once, a tarpit on the same port, and a zone with
    ``fast.test`` (the sink), ``slow.test`` (the tarpit) and ``two.test`` (the sink, then the
    tarpit as its backup MX)."""
    with smtp_sink(SINK_IP) as sink:
        pit = Tarpit(sink.server_address[1])
        zone = LoopbackDNS()
        zone.a("mx.sink.test", SINK_IP)
        zone.a("mx.pit.test", PIT_IP)
        zone.mx("fast.test", 10, "mx.sink.test")
        zone.mx("slow.test", 10, "mx.pit.test")
        zone.mx("two.test", 10, "mx.sink.test")
        zone.mx("two.test", 20, "mx.pit.test")
        yield sink, pit, zone
        zone.stop()
        pit.close()


@pytest.mark.parametrize(
    "held",
    [
        "carol@slow.test",  # another domain's MX holds the attempt
        "grey-carol@two.test",  # deferred by the sink (451), the backup MX holds it
    ],
)
def test_a_stop_while_a_host_holds_the_attempt_keeps_the_250_another_gave(
    server_factory: ServerFactory, hosts: tuple[_Server, Tarpit, LoopbackDNS], held: str
) -> None:
    sink, pit, zone = hosts
    took = "bob@" + held.rpartition("@")[2].replace("slow", "fast")
    srv = server_factory(
        domains=("a.test",),
        host=SERVER_IP,
        services=("smtp",),
        extra_toml=(
            f'[dns]\nnameservers = ["{zone.nameserver}"]\ntimeout = "3s"\n'
            f'[delivery]\nport = {sink.server_address[1]}\nconnect_timeout = "3s"\n'
            "[auth]\nallow_plaintext = true\nchecks = false\ndkim_sign = false"
        ),
    )
    srv.add_user("alice@a.test", "pw")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.login("alice@a.test", "pw")
        c.ehlo()
        assert c.mail("alice@a.test")[0] == 250
        assert c.rcpt(took, ["NOTIFY=SUCCESS"])[0] == 250  # the sink has no DSN: "relayed"
        assert c.rcpt(held)[0] == 250
        assert c.data(b"Subject: held\r\n\r\nx\r\n")[0] == 250
    wait_until(lambda: len(sink.received) == 1, 20, "the sink's copy")
    assert pit.held.wait(20), "the attempt did not reach the tarpit"

    assert srv.stop(timeout=20) == 0  # the attempt is cut off after 5 s
    assert "stopping: 1 delivery attempt(s) cut short" in srv.log.read_text()
    assert held in srv.cli("queue", "list").stdout  # for the next start

    pit.release()
    srv.start()
    srv.cli("queue", "flush")  # the retry of the held recipient, now
    wait_until(srv.queue_empty, 30, "the queue to empty after the restart")
    assert len(sink.received) == 1, "the host that answered 250 got the message again"
    assert pit.messages == 1
    dsns = srv.wait_messages("alice@a.test", 1)
    assert len(dsns) == 1 and b"Action: relayed" in dsns[0] and took.encode() in dsns[0]
