"""The connection glue with an in-memory transport: the TLS switch, EOF, flow control."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postroom.app import build_services
from postroom.config import from_dict
from postroom.smtp.server import SmtpConnection


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.paused = False

    def get_extra_info(self, key: str, default: object = None) -> object:
        return ("192.0.2.7", 25) if key == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        self.written += b"".join(parts)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return False

    def take(self) -> bytes:
        out, self.written = self.written, b""
        return out


def connect(tmp_path: Path) -> tuple[SmtpConnection, FakeTransport]:
    cfg = from_dict({"domains": ["a.test"], "data_dir": str(tmp_path)})
    services, _runner = build_services(cfg)
    conn = SmtpConnection(services, "smtp", implicit_tls=False)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert transport.take().startswith(b"220 ")
    return conn, transport


def test_plaintext_pipelined_after_starttls_is_never_answered(tmp_path: Path) -> None:
    async def main() -> None:
        conn, transport = connect(tmp_path)
        conn.data_received(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
        replies = transport.take()
        assert replies.endswith(b"220 2.0.0 Ready to start TLS\r\n")
        assert b"Sender" not in replies and conn.tls is not None and not conn.tls.ready
        # What follows is TLS to the glue: plaintext is a failed handshake, never a command.
        conn.data_received(b"RCPT TO:<victim@a.test>\r\n")
        assert transport.closed and b"250" not in transport.take()

    asyncio.run(main())


def test_commands_before_eof_are_all_answered_then_closed(tmp_path: Path) -> None:
    async def main() -> None:
        conn, transport = connect(tmp_path)
        conn.data_received(b"EHLO c.test\r\nNOOP\r\nRSET\r\n")
        assert conn.eof_received() is True  # kept open to answer
        out = transport.take()
        assert out.count(b"\r\n250 ") == 3 and transport.closed

    asyncio.run(main())


def test_a_client_that_does_not_read_stops_being_served(tmp_path: Path) -> None:
    async def main() -> None:
        conn, transport = connect(tmp_path)
        conn.data_received(b"EHLO c.test\r\n")
        transport.take()
        conn.pause_writing()
        conn.data_received(b"NOOP\r\n" * 10)
        assert transport.take() == b""  # nothing executed while its buffer is full
        conn.resume_writing()
        assert transport.take().count(b"250 ") == 10

    asyncio.run(main())
