"""The connection glue with an in-memory transport: the TLS switch, EOF, flow control."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from postroom import connection
from postroom.app import build_services
from postroom.config import from_dict
from postroom.smtp.server import SmtpConnection


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = self.aborted = False
        self.paused = False
        self.unsent = 0  # what a transport holds that the client has not read
        self.high_water: int | None = None  # past it, the protocol's pause_writing
        self.protocol: SmtpConnection | None = None

    def get_extra_info(self, key: str, default: object = None) -> object:
        return ("192.0.2.7", 25) if key == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data
        if self.high_water is not None and len(self.written) > self.high_water:
            assert self.protocol is not None
            self.high_water = None
            self.protocol.pause_writing()

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

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
    transport.protocol = conn
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


def test_replies_to_a_long_pipeline_wait_for_the_client_to_read(tmp_path: Path) -> None:
    """Thousands of pipelined commands were all answered into memory before the first write:
    400 KB of EHLO made 4 MB. The replies go out in batches; once the client's buffer is full
    no more commands are read until it reads."""

    async def main() -> None:
        conn, transport = connect(tmp_path)
        transport.high_water = 8192
        conn.data_received(b"NOOP\r\n" * 4000)
        answered = transport.take().count(b"250 ")
        assert 0 < answered < 1000 and transport.paused  # a batch, then reading stopped
        conn.resume_writing()
        # One turn's replies, then the other sessions' turns; the rest follows.
        rest = transport.take().count(b"250 ")
        assert 0 < rest <= connection.REPLIES_PER_TURN
        for _ in range(100):
            await asyncio.sleep(0)
            rest += transport.take().count(b"250 ")
        assert rest == 4000 - answered

    asyncio.run(main())


def test_sessions_with_long_pipelines_take_one_turn_per_loop_iteration(tmp_path: Path) -> None:
    """A turn for each such session in every iteration made an iteration, where the loop reads
    the other sessions' input and accepts a connection, last as long as all their turns."""

    async def main() -> None:
        turn = connection.REPLIES_PER_TURN
        sessions = [connect(tmp_path / str(i)) for i in range(3)]
        for conn, transport in sessions:
            conn.data_received(b"NOOP\r\n" * (turn * 4))
            assert transport.take().count(b"250 ") == turn and transport.paused
        order = []
        for _ in range(9):
            await asyncio.sleep(0)  # one iteration of the loop
            made = [transport.take().count(b"250 ") for _, transport in sessions]
            assert sorted(made) == [0, 0, turn]  # one turn in all, not one each
            order.append(made.index(turn))
        assert order == [0, 1, 2] * 3  # in turn
        for _ in range(3):
            await asyncio.sleep(0)  # each finds its input all read: reading goes on
        assert not any(transport.paused or transport.take() for _, transport in sessions)

    asyncio.run(main())


def test_a_loop_that_ends_with_sessions_waiting_for_their_turn_is_let_go(tmp_path: Path) -> None:
    """The queue of turns is kept per loop: holding its sessions (and by them the loop, its
    key) kept every loop that ended with one waiting alive, with its sessions' services."""
    loops = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        conn, _transport = connect(tmp_path / str(len(loops)))
        conn.data_received(b"NOOP\r\n" * (connection.REPLIES_PER_TURN * 50))
        assert conn._waiting  # the loop ends before its next turn

    for _ in range(3):
        asyncio.run(main())
    gc.collect()
    assert [ref() for ref in loops] == [None, None, None]


def test_a_turn_that_raises_does_not_stop_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        turn = connection.REPLIES_PER_TURN
        raised: list[object] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: raised.append(ctx))
        (bad, _), (good, transport) = connect(tmp_path / "a"), connect(tmp_path / "b")
        for conn in (bad, good):
            conn.data_received(b"NOOP\r\n" * (turn * 2))
        transport.take()

        def boom() -> None:
            raise RuntimeError("a bug")

        bad.another_turn = boom  # type: ignore[method-assign]
        for _ in range(3):
            await asyncio.sleep(0)
        assert raised and transport.take().count(b"250 ") == turn

    asyncio.run(main())


def test_a_closing_client_that_never_reads_is_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close waits for the client to read its last replies; one that never does held its
    place, and its slots under max_connections and max_connections_per_ip, for good. It is
    kept (and counted) while it reads on, closed once all is read, reset once it stops."""
    monkeypatch.setattr(connection, "CLOSE_GRACE", 0.0)  # each tick (called here) is past it

    async def main() -> None:
        conn, transport = connect(tmp_path)
        transport.unsent = 70_000
        conn.data_received(b"QUIT\r\n")
        assert not transport.closed  # waits for the client to read
        conn._close_when_read(transport)  # type: ignore[arg-type]
        assert transport.aborted
        reader, reader_transport = connect(tmp_path)
        reader_transport.unsent = 70_000
        reader.data_received(b"QUIT\r\n")
        for left in (40_000, 10_000):  # reading on: kept
            reader_transport.unsent = left
            reader._close_when_read(reader_transport)  # type: ignore[arg-type]
            assert not reader_transport.closed
        reader_transport.unsent = 0
        reader._close_when_read(reader_transport)  # type: ignore[arg-type]
        assert reader_transport.closed and not reader_transport.aborted
        quiet, quiet_transport = connect(tmp_path)  # all read: closed at once, never reset
        quiet.data_received(b"QUIT\r\n")
        assert quiet_transport.closed and not quiet_transport.aborted

    asyncio.run(main())


def test_after_the_time_out_a_client_reading_on_is_kept_one_that_stopped_is_reset(
    tmp_path: Path,
) -> None:
    """Past the idle limit, a client still taking in our answer (16 KiB within 10 s of the
    last look) is not idle: a slow reader of a large RETR was reset in the middle of it
    while the server's buffer was full. One that takes in nothing for 10 s more is reset
    (it had been given the whole idle limit again)."""

    async def main() -> None:
        conn, transport = connect(tmp_path)
        transport.unsent = 200_000
        conn.pause_writing()
        t = conn.last_activity + conn.idle_limit() + 1
        for now, left in ((t, 200_000), (t + 5, 195_000), (t + 9, 150_000), (t + 18, 140_000)):
            transport.unsent = left
            conn.check_timeout(now)
            assert not transport.closed, now - t  # reading on: kept
        conn.check_timeout(t + 19.5)  # 10 s since it last took in 16 KiB
        assert transport.aborted

    asyncio.run(main())
