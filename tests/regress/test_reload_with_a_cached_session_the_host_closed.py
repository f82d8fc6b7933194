"""A SIGHUP ends the cached outgoing SMTP sessions with QUIT; one whose host had hung up
meanwhile raised on the write ("unable to perform operation on <TCPTransport closed=True>"),
and the rest of the reload was skipped in that worker: the new connection limits, the
``[auth]`` throttle and the log level were not applied until the next SIGHUP.

And only the first worker closed its idle cached sessions: another worker's stayed open until
each host hung up."""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Server, ServerFactory, free_port, wait_until
from tests.dnszone import LoopbackDNS

SERVER_IP, MX_IP = "127.0.0.163", "127.0.0.164"


class HangingUpMX:
    """Takes messages; hangs up right after the 250 to a dot when ``hang_up``, else keeps the
    session open. ``open`` counts the sessions still open on its side."""

    def __init__(self, hang_up: bool) -> None:
        self.listener = socket.create_server((MX_IP, free_port(MX_IP)))
        self.port = self.listener.getsockname()[1]
        self.hang_up = hang_up
        self.messages = 0
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 mx.far.test ESMTP\r\n")
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-mx.far.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while (data := f.readline()) and data != b".\r\n":
                        pass
                    self.messages += 1
                    conn.sendall(b"250 2.0.0 taken\r\n")
                    if self.hang_up:
                        return
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 OK\r\n")
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    zone = LoopbackDNS()
    zone.mx("far.test", 10, "mx.far.test")
    zone.a("mx.far.test", MX_IP)
    yield zone
    zone.stop()


def _server(server_factory: ServerFactory, dns: LoopbackDNS, mx: HangingUpMX, more: str) -> Server:
    srv = server_factory(
        domains=("a.test",),
        host=SERVER_IP,
        services=("smtp",),
        extra_toml=(
            f"{more}\n"
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            f"[delivery]\nport = {mx.port}\n"
            "[auth]\nallow_plaintext = true\nchecks = false\ndkim_sign = false"
        ),
    )
    srv.add_user("alice@a.test", "pw")
    return srv


def _send(srv: Server, count: int = 1) -> None:
    for _ in range(count):
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.login("alice@a.test", "pw")
            c.sendmail("alice@a.test", ["bob@far.test"], b"Subject: far\r\n\r\nx\r\n")


def test_a_reload_is_applied_whole_with_a_dead_cached_session(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    mx = HangingUpMX(hang_up=True)
    try:
        srv = _server(server_factory, dns, mx, "")
        _send(srv)
        wait_until(lambda: mx.messages == 1 and mx.open == 0, 20, "the MX to take it and hang up")
        time.sleep(0.3)  # (its hang-up reaches the cached session)
        srv.config.write_text(
            srv.config.read_text().replace("[limits]\n", "[limits]\nmax_connections = 2\n")
            if "[limits]\n" in srv.config.read_text()
            else srv.config.read_text() + "\n[limits]\nmax_connections = 2\n"
        )
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in srv.log.read_text(), 10, "the reload")
        assert "unable to perform operation" not in srv.log.read_text()
        socks = [socket.create_connection((srv.host, srv.ports["smtp"]), 10) for _ in range(3)]
        try:
            greetings = [s.recv(200)[:3] for s in socks]
        finally:
            for s in socks:
                s.close()
        assert greetings == [b"220", b"220", b"421"]
    finally:
        mx.close()


def test_every_worker_closes_its_idle_cached_sessions(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    mx = HangingUpMX(hang_up=False)
    try:
        srv = _server(server_factory, dns, mx, "workers = 2")
        _send(srv, 8)  # (each connection goes to either worker)
        wait_until(lambda: mx.messages == 8, 20, "the MX to take them")
        assert mx.open >= 1
        # Sessions idle for 10 s are closed; give each worker's sweep a few seconds more.
        wait_until(lambda: mx.open == 0, 20, "every cached session to be closed")
    finally:
        mx.close()
