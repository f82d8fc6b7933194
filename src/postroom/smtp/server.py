"""asyncio glue for the SMTP listeners: accept, feed bytes to the engine, write replies, TLS.

Thin on purpose: the protocol lives in ``server_engine.py``, the policy in ``policy.py``.
What lives here: connection limits, flow control, STARTTLS, time-outs and graceful shutdown.

Events are handled right inside ``data_received`` when the policy can answer at once (almost
all of them); only the end of a message (disk), AUTH (argon2) and STARTTLS (handshake) run as
a task, during which further input is buffered by the engine, not read. This keeps a
transaction to a handful of Python calls: no task switch per command.

STARTTLS: reading is paused *before* the 220 is written, so the client's handshake can never be
read as plaintext, and plaintext pipelined after STARTTLS is discarded by the engine (RFC 3207
§4.2, CVE-2011-0411). Time-outs (RFC 5321 §4.5.3.2) are enforced by :class:`IdleSweeper`, one
periodic check for all connections instead of a timer per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import TYPE_CHECKING

from postroom import events, logs
from postroom.flow import FlowControl
from postroom.smtp.policy import Port, SmtpPolicy
from postroom.smtp.server_engine import (
    AuthResponse,
    AuthStart,
    Closing,
    DataChunk,
    DataStart,
    Event,
    HelloReceived,
    MailFrom,
    MessageAborted,
    MessageEnd,
    NeedData,
    RcptTo,
    ServerEngine,
    StartTLS,
    State,
    TransactionReset,
)
from postroom.tls import tls_version
from postroom.tlsgate import refuses_old_tls
from postroom.wire import replies

if TYPE_CHECKING:
    from postroom.services import Services

READ_HIGH_WATER = 1 << 20


class SmtpConnection(FlowControl, asyncio.Protocol):
    """One client connection, driven by the bytes that arrive."""

    def __init__(self, services: Services, port: Port, implicit_tls: bool) -> None:
        self.services = services
        self.port = port
        self.implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.proto: ServerEngine | None = None
        self.session: SmtpPolicy | None = None
        self.last_activity = 0.0
        self.started = 0.0
        self._lost = False
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._task: asyncio.Task[None] | None = None
        self._tls_early: list[bytes] | None = None
        self.received = 0

    def __del__(self) -> None:
        # On an implicit-TLS port asyncio makes the protocol, then does the handshake, and
        # calls connection_made only if it succeeds: one never connected failed its handshake.
        if self.implicit_tls and self.transport is None:
            events.implicit_tls_failed(self.port)

    # -- asyncio.Protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        services = self.services
        sock = transport.get_extra_info("socket")
        fileno = sock.fileno() if sock is not None else -1
        if services.stopping or not services.connections.acquire(self.client_ip, self, fileno):
            self.transport.write(replies.TOO_MANY_CONNECTIONS.render())  # type: ignore[union-attr]
            transport.close()
            self._lost = True
            why = "stopping" if services.stopping else "connection_limit"
            events.connection_refused(self.port, self.client_ip, why)
            return
        self.session = SmtpPolicy(services, self.port, self.client_ip, tls=self.implicit_tls)
        self.proto = ServerEngine(self.session.features(), tls_active=self.implicit_tls)
        self.started = self.last_activity = time.monotonic()
        events.connected(self.port, self.client_ip)
        if self.implicit_tls:
            self.session.tls_version = tls_version(transport)
            events.tls_handshake(self.port, self.client_ip, self.session.tls_version, None)
        self.transport.write(services.banner)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            # Decrypted data that arrived with the end of the handshake, before start_tls()
            # returned (asyncio does this): it belongs to the new session, keep it for it.
            self._tls_early.append(data)
            return
        proto = self.proto
        if proto is None or self._lost:
            return  # closing: input is dropped
        self.last_activity = time.monotonic()
        self.received += len(data)
        proto.receive_data(data)
        if self._task is None and not self._write_paused:
            self._process()
        if proto.pending_input() > READ_HIGH_WATER and not self._read_paused:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        # Keep the transport open: answer what the client pipelined before its FIN, then close.
        if self._lost or self.proto is None:
            return None
        self._eof = True
        if self._task is None:
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.services.connections.release(self.client_ip, self)
        if self.session is not None:
            seconds = time.monotonic() - self.started
            events.disconnected(self.port, self.client_ip, self.received, self.sent, seconds)
            if self._task is None:
                self.session.reset()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop executing its commands until it does.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._task is None:
            self._process()

    # -- processing ----------------------------------------------------------------------------

    def _engine(self) -> ServerEngine | None:
        return self.proto

    def _process(self) -> None:
        """Run engine events until it needs input, or an event needs a task."""
        proto, session = self.proto, self.session
        assert proto is not None and session is not None
        try:
            while not self._lost:
                event = proto.next_event()
                if isinstance(event, NeedData):
                    self._flush()
                    if proto.state is State.CLOSED or self._eof:
                        self._close()
                    elif proto.pending_input() < READ_HIGH_WATER:
                        self._resume_reading()
                    return
                if isinstance(event, DataChunk):
                    session.on_data(event.data)
                elif isinstance(event, RcptTo):
                    proto.reply(session.on_rcpt(event.command))
                elif isinstance(event, MailFrom):
                    proto.reply(session.on_mail(event.command))
                elif isinstance(event, DataStart):
                    session.on_data_start()
                elif isinstance(event, MessageAborted):
                    session.on_aborted(event.reply)
                elif isinstance(event, TransactionReset):
                    session.reset()
                elif isinstance(event, HelloReceived):
                    session.reset()
                    session.helo = event.domain
                elif isinstance(event, Closing):
                    self._flush()
                    self._close(linger=event.reply.code != 221)
                    return
                else:
                    # MessageEnd, AuthStart/AuthResponse, StartTLS: these wait for something.
                    if isinstance(event, StartTLS):
                        self._pause_reading()  # before the 220 goes out
                    self._flush()
                    self._task = asyncio.get_running_loop().create_task(self._wait(event))
                    return
        except Exception:
            self._crashed()

    async def _wait(self, event: Event) -> None:
        proto, session = self.proto, self.session
        assert proto is not None and session is not None
        try:
            if isinstance(event, MessageEnd):
                proto.reply(await session.on_message_end())
                if self.services.stopping:
                    proto.close(replies.SHUTTING_DOWN)
            elif isinstance(event, AuthStart | AuthResponse):
                await session.on_auth(proto, event)
            elif isinstance(event, StartTLS):
                await self._starttls(session, proto)
        except Exception:
            self._task = None
            self._crashed()
            return
        self._task = None
        self.last_activity = time.monotonic()
        if not self._write_paused:
            self._process()

    def _crashed(self) -> None:
        self.services.log.exception("SMTP session with %s failed", self.client_ip)
        if not self._lost and self.transport is not None:
            self.transport.write(replies.LOCAL_ERROR.render())
        if self.session is not None:
            self.session.reset()
        self._close()

    def _close(self, linger: bool = False) -> None:
        """Close; with ``linger``, half-close first and drop input for a moment, so that a client
        still sending (pipelined garbage) reads our last reply instead of a TCP reset."""
        transport = self.transport
        if transport is not None and not self._lost:
            if linger and transport.can_write_eof():
                transport.write_eof()
                self._lost = True
                self.proto = None
                asyncio.get_running_loop().call_later(2.0, transport.close)
                return
            transport.close()
        self._lost = True

    async def _starttls(self, session: SmtpPolicy, proto: ServerEngine) -> None:
        transport = self.transport
        assert transport is not None and self.services.tls is not None
        # The engine dropped what was pipelined after STARTTLS and reading was paused before
        # the 220 went out (RFC 3207 §4.2, CVE-2011-0411): no plaintext octet is left. From
        # here on data_received is fed by the TLS layer only (start_tls swaps the protocol
        # before it reads again).
        if proto.pending_input():
            self.services.log.error("STARTTLS with %s: input left at the switch", self.client_ip)
            self._close()
            return
        if await refuses_old_tls(transport, self.services.cfg.limits.tls_handshake_timeout):
            self._close()  # a TLS 1.0/1.1-only client: refused with protocol_version
            return
        self._tls_early = []
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                transport,
                self,
                self.services.tls,
                server_side=True,
                ssl_handshake_timeout=self.services.cfg.limits.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._tls_early = None
            events.tls_handshake(self.port, self.client_ip, None, str(exc) or type(exc).__name__)
            self._close()
            return
        early, self._tls_early = self._tls_early, None
        if new is None:
            self._close()
            return
        self.transport = new
        self._read_paused = False
        session.tls_started(proto)
        session.tls_version = tls_version(new)
        events.tls_handshake(self.port, self.client_ip, session.tls_version, None)
        proto.receive_data(b"".join(early))

    # -- time-outs and shutdown ----------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called about once a second: 421 to a session that waited too long."""
        proto = self.proto
        if proto is None or self._lost or self._task is not None:
            return
        limits = self.services.cfg.limits
        idle = (
            limits.data_timeout
            if proto.state in (State.DATA, State.BDAT)
            else limits.command_timeout
        )
        if now - self.last_activity > idle or now - self.started > limits.session_timeout:
            proto.close(replies.TIMEOUT)
            self._flush()
            self._close()

    def shutdown(self) -> None:
        """Server stopping: an idle session gets 421 now; a busy one finishes its message."""
        proto = self.proto
        if proto is None or self._lost or self._task is not None:
            return
        if proto.state not in (State.DATA, State.BDAT):
            proto.close(replies.SHUTTING_DOWN)
            self._flush()
            self._close()


class IdleSweeper:
    """One periodic task that applies the time-outs of every live connection."""

    def __init__(self, services: Services, interval: float = 1.0) -> None:
        self.services = services
        self.interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            logs.flush()
            events.flush_metrics()
            now = time.monotonic()
            for conn in list(self.services.connections.live):
                with contextlib.suppress(Exception):
                    conn.check_timeout(now)
