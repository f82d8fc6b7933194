"""asyncio glue for the SMTP listeners: accept, feed bytes to the engine, write replies, TLS.

Thin on purpose: the protocol lives in ``server_protocol.py``, the policy in ``session.py``.
What lives here: connection limits, RFC 5321 §4.5.3.2 time-outs, read/write flow control,
STARTTLS (reading is paused *before* the 220 goes out, so a client's TLS handshake can never be
read as plaintext and plaintext pipelined before it is discarded by the engine), and graceful
shutdown (idle sessions get 421, a message being stored is finished first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING

from postroom.smtp import replies
from postroom.smtp.server_protocol import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Closing,
    DataChunk,
    DataStart,
    HelloReceived,
    MailFrom,
    MessageAborted,
    MessageEnd,
    RcptTo,
    ServerProtocol,
    StartTLS,
    State,
    TransactionReset,
)
from postroom.smtp.session import Port, SmtpSession

if TYPE_CHECKING:
    from postroom.app import Services

READ_HIGH_WATER = 1 << 20


class SmtpConnection(asyncio.Protocol):
    """One client connection: bytes in and out, one task running the session."""

    def __init__(self, services: Services, port: Port, implicit_tls: bool) -> None:
        self.services = services
        self.port = port
        self.implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self._wake = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost = False
        self._eof = False
        self._read_paused = False
        self._busy = False  # storing a message: let it finish at shutdown
        self._task: asyncio.Task[None] | None = None
        self.proto: ServerProtocol | None = None

    # -- asyncio.Protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        if not self.services.connections.acquire(self.client_ip, self):
            transport.write(replies.TOO_MANY_CONNECTIONS.render())
            transport.close()
            self._lost = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.proto is None:
            return
        self.proto.receive_data(data)
        if self.proto.pending_input() > READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True
        self._wake.set()

    def eof_received(self) -> bool | None:
        # Keep the transport open: answer what the client pipelined before its FIN, then close.
        self._eof = True
        self._wake.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake.set()
        self._can_write.set()
        self.services.connections.release(self.client_ip, self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- the session task ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Server stopping: an idle session gets 421 now; a busy one finishes its message."""
        if self.proto is not None and not self._busy and self.proto.state not in (
                State.DATA, State.BDAT):
            self.proto.close(replies.SHUTTING_DOWN)
            self._flush()
            self._close()

    def _flush(self) -> None:
        if self.proto is not None and self.transport is not None and not self._lost:
            out = self.proto.data_to_send()
            if out:
                self.transport.write(out)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._lost = True
        self._wake.set()

    async def _run(self) -> None:
        services = self.services
        limits = services.cfg.limits
        session = SmtpSession(services, self.port, self.client_ip, tls=self.implicit_tls)
        proto = ServerProtocol(session.features(), tls_active=self.implicit_tls)
        self.proto = proto
        assert self.transport is not None
        self.transport.write(
            f"220 {services.cfg.hostname} ESMTP postroom ready\r\n".encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.session_timeout
        try:
            while not self._lost:
                event = proto.next_event()
                if event is NEED_DATA:
                    self._flush()
                    if proto.state is State.CLOSED or self._eof:
                        break
                    if self._read_paused and self.transport is not None:
                        self._read_paused = False
                        self.transport.resume_reading()
                    if not self._can_write.is_set():
                        await self._can_write.wait()
                    self._wake.clear()
                    timeout = limits.data_timeout if proto.state in (State.DATA, State.BDAT) \
                        else limits.command_timeout
                    timeout = min(timeout, max(0.0, deadline - loop.time()))
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        proto.close(replies.TIMEOUT)
                        self._flush()
                        break
                    continue
                if isinstance(event, DataChunk):
                    session.on_data(event.data)
                elif isinstance(event, MailFrom):
                    proto.reply(session.on_mail(event.command))
                elif isinstance(event, RcptTo):
                    proto.reply(session.on_rcpt(event.command))
                elif isinstance(event, DataStart):
                    session.on_data_start()
                elif isinstance(event, MessageEnd):
                    self._busy = True
                    try:
                        proto.reply(await session.on_message_end())
                    finally:
                        self._busy = False
                    if services.stopping:
                        proto.close(replies.SHUTTING_DOWN)
                elif isinstance(event, MessageAborted | TransactionReset):
                    session.reset()
                elif isinstance(event, HelloReceived):
                    session.reset()
                    session.helo = event.domain
                elif isinstance(event, AuthStart | AuthResponse):
                    await session.on_auth(proto, event)
                elif isinstance(event, StartTLS):
                    await self._starttls(session, proto)
                elif isinstance(event, Closing):
                    self._flush()
                    break
        except Exception:
            services.log.exception("SMTP session with %s failed", self.client_ip)
            if not self._lost and self.transport is not None:
                self.transport.write(replies.LOCAL_ERROR.render())
        finally:
            session.reset()
            self._flush()
            self._close()

    async def _starttls(self, session: SmtpSession, proto: ServerProtocol) -> None:
        transport = self.transport
        assert transport is not None and self.services.tls is not None
        transport.pause_reading()
        self._flush()  # the 220
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                transport, self, self.services.tls, server_side=True,
                ssl_handshake_timeout=self.services.cfg.limits.tls_handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.services.log.info("STARTTLS with %s failed: %s", self.client_ip, exc)
            self._close()
            return
        if new is None:
            self._close()
            return
        self.transport = new  # type: ignore[assignment]
        session.tls_started(proto)


async def start(services: Services, host: str, port: int, kind: Port) -> asyncio.Server:
    """Listen for SMTP on ``host:port``; ``submissions`` is implicit TLS (RFC 8314)."""
    loop = asyncio.get_running_loop()
    implicit = kind == "submissions"
    ssl_ctx = services.tls if implicit else None
    server = await loop.create_server(
        lambda: SmtpConnection(services, kind, implicit), host, port,
        ssl=ssl_ctx, reuse_address=True, backlog=1024,
        ssl_handshake_timeout=services.cfg.limits.tls_handshake_timeout if implicit else None)
    return server


def shutdown_connections(conns: list[SmtpConnection]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.shutdown()
