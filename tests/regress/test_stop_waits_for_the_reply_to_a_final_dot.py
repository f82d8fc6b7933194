"""On SIGTERM the queue runner cut off its deliveries after 5 s, also one whose final dot was
already out and whose host was about to answer: the host had the message, postroom did not
record it, and sent it again after the restart (RFC 5321 §6.1 allows that only for a reply
that never comes). A delivery waiting for the reply to its dot is now waited for until the
stop's deadline (8 s), within the 10 s the server has to exit."""

from __future__ import annotations

import smtplib
import socket
import threading
import time

from tests.conftest import ServerFactory, free_port
from tests.dnszone import LoopbackDNS

SERVER_IP, PEER_IP = "127.0.0.173", "127.0.0.174"
REPLY_AFTER = 6.5  # seconds after the final dot: past the 5 s, within the 8 s


class SlowPeer:
    """An MX that takes the whole message and answers its final dot after REPLY_AFTER s."""

    def __init__(self) -> None:
        self.listener = socket.create_server((PEER_IP, free_port(PEER_IP)))
        self.got_dot = threading.Event()
        self.messages = 0
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
            conn.sendall(b"220 slow.test ESMTP\r\n")
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-slow.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while (data := f.readline()) and data != b".\r\n":
                        pass
                    self.got_dot.set()
                    time.sleep(REPLY_AFTER)
                    self.messages += 1
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 OK\r\n")


def test_sigterm_waits_for_the_reply_to_a_final_dot_already_sent(
    server_factory: ServerFactory,
) -> None:
    peer = SlowPeer()
    zone = LoopbackDNS()
    try:
        zone.mx("slow.test", 10, "mx.slow.test")
        zone.a("mx.slow.test", PEER_IP)
        srv = server_factory(
            domains=("a.test",),
            host=SERVER_IP,
            services=("smtp",),
            extra_toml=(
                f'[dns]\nnameservers = ["{zone.nameserver}"]\ntimeout = "3s"\n'
                f"[delivery]\nport = {peer.listener.getsockname()[1]}\n"
                "[auth]\nallow_plaintext = true\nchecks = false\ndkim_sign = false"
            ),
        )
        srv.add_user("alice@a.test", "pw")
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.login("alice@a.test", "pw")
            c.sendmail("alice@a.test", ["bob@slow.test"], b"Subject: slow\r\n\r\nx\r\n")
        assert peer.got_dot.wait(20), "the delivery did not reach the peer"
        t0 = time.monotonic()
        code = srv.stop(timeout=20)
        elapsed = time.monotonic() - t0
        assert code == 0 and elapsed < 10, (code, elapsed)
        assert peer.messages == 1
        # The reply was waited for and recorded: nothing is left to send again.
        assert srv.cli("queue", "list").stdout == ""
    finally:
        peer.listener.close()
        zone.stop()
