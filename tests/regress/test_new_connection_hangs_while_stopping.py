"""After SIGTERM, while a message still being received kept the server up, a new client's
connection was completed by the kernel and then never answered: the workers had closed their
listening sockets, but the supervisor's copies kept the ports open, so the client hung in the
backlog until the server exited and reset it. A stopping server has stopped accepting: a new
client is refused at once (and a sending MTA moves on to the next MX), while the message in
flight is still finished."""

from __future__ import annotations

import signal
import socket
import time

from tests.conftest import ServerFactory, first_line, wait_until


def test_new_connection_is_refused_while_a_message_finishes(server_factory: ServerFactory) -> None:
    srv = server_factory(
        host="127.0.0.175", services=("smtp",), extra_toml="[auth]\nchecks = false"
    )
    port = srv.ports["smtp"]
    busy = socket.create_connection((srv.host, port), timeout=20)
    assert first_line(busy).startswith(b"220 ")
    busy.sendall(b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster@a.test>\r\nDATA\r\n")
    seen = b""
    while b"354 " not in seen:
        chunk = busy.recv(4096)
        assert chunk, seen
        seen += chunk
    busy.sendall(b"Subject: in flight\r\n\r\nfirst half")
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in srv.log.read_text(), 10, "the server to stop")

    started = time.monotonic()
    try:
        with socket.create_connection((srv.host, port), timeout=3) as late:
            answer = first_line(late)  # a 421 would do too; silence would not
        assert answer.startswith(b"421 "), answer
    except ConnectionRefusedError:
        pass
    except TimeoutError:
        raise AssertionError("the new connection was accepted and never answered") from None
    assert time.monotonic() - started < 2.5

    busy.sendall(b", second half\r\n.\r\n")
    assert first_line(busy).startswith(b"250 ")
    busy.close()
    assert srv.stop() == 0
    assert b"second half" in srv.wait_messages("postmaster@a.test", 1)[0]
