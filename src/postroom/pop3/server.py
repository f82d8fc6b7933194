"""asyncio glue for the POP3 listeners (110 with STLS, 995 with implicit TLS, RFC 8314).

Like the SMTP glue: commands are answered inside ``data_received``; logins (argon2, the
mailbox lock and listing) and large RETRs run as a task while further input waits in the
engine's buffer. RETR streams a large message in pieces with flow control, so a 50 MB message
is never held in memory twice. STLS pauses reading before the ``+OK`` is written (no plaintext
survives the switch, RFC 2595 §4). Failed logins are answered after the throttle's delay, the
same way for an unknown user and a wrong password.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from typing import TYPE_CHECKING

from postroom import events, sasl
from postroom.address import parse_user_address
from postroom.errors import AddressError
from postroom.flow import FlowControl
from postroom.pop3.engine import (
    AuthResponse,
    AuthStart,
    Closing,
    Command,
    Event,
    Features,
    Login,
    NeedData,
    Pop3Engine,
    Quit,
    StartTLS,
    State,
)
from postroom.pop3.maildrop import MailboxInUse, Maildrop, TopFilter, chunks
from postroom.storage.local import maildir
from postroom.tls import tls_version
from postroom.tlsgate import refuses_old_tls
from postroom.wire.framing import Stuffer, dot_stuff

if TYPE_CHECKING:
    from postroom.services import Services

READ_HIGH_WATER = 1 << 16
SMALL_MESSAGE = 1 << 18  # read and sent in one go; larger ones stream
CHUNK = 1 << 18


class Pop3Connection(FlowControl, asyncio.Protocol):
    """One POP3 client connection."""

    def __init__(self, services: Services, implicit_tls: bool) -> None:
        self.services = services
        self.implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.proto: Pop3Engine | None = None
        self.drop: Maildrop | None = None
        self.user: str | None = None
        self.last_activity = 0.0
        self._lost = False
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._mech: sasl.Mechanism | None = None
        self._tls_early: list[bytes] | None = None
        self._stopping = False
        self.service = "pop3s" if implicit_tls else "pop3"
        self.received = 0
        self.started = 0.0
        self._mech_name = "USER"

    def __del__(self) -> None:
        # See SmtpConnection.__del__: a protocol never connected failed its TLS handshake.
        if self.implicit_tls and self.transport is None:
            events.implicit_tls_failed(self.service)

    # -- callbacks -----------------------------------------------------------------------------

    def features(self) -> Features:
        tls = self.implicit_tls or (self.proto is not None and self.proto.tls_active)
        return Features(
            starttls=self.services.tls is not None and not tls,
            login_allowed=tls or self.services.cfg.auth.allow_plaintext,
            max_errors=self.services.cfg.limits.max_errors,
            max_commands=self.services.cfg.limits.max_commands,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        sock = transport.get_extra_info("socket")
        fileno = sock.fileno() if sock is not None else -1
        connections = self.services.connections
        if self.services.stopping or not connections.acquire(self.client_ip, self, fileno):
            transport.write(b"-ERR [SYS/TEMP] Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            self._lost = True
            why = "stopping" if self.services.stopping else "connection_limit"
            events.connection_refused(self.service, self.client_ip, why)
            return
        self.proto = Pop3Engine(self.features(), tls_active=self.implicit_tls)
        self.started = self.last_activity = time.monotonic()
        events.connected(self.service, self.client_ip)
        if self.implicit_tls:
            events.tls_handshake(self.service, self.client_ip, tls_version(transport), None)
        transport.write(b"+OK postroom POP3 server ready\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            # Decrypted data that arrived with the end of the handshake, before start_tls()
            # returned (asyncio does this): it belongs to the new session, keep it for it.
            self._tls_early.append(data)
            return
        proto = self.proto
        if proto is None or self._lost:
            return
        self.last_activity = time.monotonic()
        self.received += len(data)
        proto.receive_data(data)
        if self._task is None and not self._write_paused:
            self._process()
        if proto.pending_input() > READ_HIGH_WATER and not self._read_paused:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        if self._lost or self.proto is None:
            return None
        self._eof = True
        if self._task is None:
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._writable.set()
        self.services.connections.release(self.client_ip, self)
        self._release()
        if self.proto is not None:
            seconds = time.monotonic() - self.started
            events.disconnected(self.service, self.client_ip, self.received, self.sent, seconds)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.last_activity = time.monotonic()  # the client is reading: it is not idle
        self._writable.set()
        if self._task is None and not self._lost:
            self._process()

    # -- processing ----------------------------------------------------------------------------

    def _release(self) -> None:
        """A dropped connection deletes nothing (RFC 1939 §6): just unlock."""
        if self.drop is not None:
            self.drop.close()
            self.drop = None

    def _engine(self) -> Pop3Engine | None:
        return self.proto

    def _close(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()
        self._lost = True
        self._release()

    def _process(self) -> None:
        proto = self.proto
        assert proto is not None
        try:
            while not self._lost:
                event = proto.next_event()
                if isinstance(event, NeedData):
                    self._flush()
                    if proto.state is State.CLOSED or self._eof:
                        self._close()
                    else:
                        self._resume_reading()
                    return
                if isinstance(event, Command) and self._command(proto, event):
                    self._flush()
                    if self._write_paused:
                        # A client that pipelines faster than it reads: go on when its
                        # buffer drains (resume_writing), holding at most one answer here.
                        self._pause_reading()
                        return
                    continue
                if isinstance(event, Closing):
                    self._flush()
                    self._close()
                    return
                if isinstance(event, StartTLS):
                    self._pause_reading()  # before the +OK goes out
                self._flush()
                self._task = asyncio.get_running_loop().create_task(self._wait(event))
                return
        except Exception:
            self._crashed()

    def _crashed(self) -> None:
        self.services.log.exception("POP3 session with %s failed", self.client_ip)
        if self.transport is not None and not self._lost:
            self.transport.write(b"-ERR [SYS/TEMP] Internal error\r\n")
        self._close()

    async def _wait(self, event: Event) -> None:
        proto = self.proto
        assert proto is not None
        try:
            if isinstance(event, Login):
                await self._login(proto, event.user, event.password)
            elif isinstance(event, AuthStart | AuthResponse):
                await self._auth(proto, event)
            elif isinstance(event, Command):
                await self._stream(proto, event)
            elif isinstance(event, Quit):
                await self._quit(proto)
            elif isinstance(event, StartTLS):
                await self._starttls(proto)
        except Exception:
            self._task = None
            self._crashed()
            return
        self._task = None
        self.last_activity = time.monotonic()
        if self._stopping and proto.state is not State.CLOSED:
            self.shutdown()
        elif not self._lost and not self._write_paused:
            self._process()

    # -- TRANSACTION ---------------------------------------------------------------------------

    def _command(self, proto: Pop3Engine, cmd: Command) -> bool:
        """Answer a TRANSACTION command at once; False if it needs a task (a large message)."""
        drop = self.drop
        assert drop is not None
        verb = cmd.verb
        if verb == "NOOP":
            proto.ok()
        elif verb == "STAT":
            count, size = drop.stat()
            proto.ok(f"{count} {size}")  # RFC 1939 §5: exactly "+OK nn mm"
        elif verb == "RSET":
            drop.reset()
            count, size = drop.stat()
            proto.ok(f"{count} messages ({size} octets)")
        elif cmd.msg is None:  # LIST or UIDL of the whole mailbox
            if verb == "LIST":
                count, size = drop.stat()
                proto.multiline(f"{count} messages ({size} octets)", drop.listing(uids=False))
            else:
                proto.multiline("Unique-ID listing follows", drop.listing(uids=True))
        else:
            entry = drop.get(cmd.msg)
            if entry is None:
                proto.err("No such message")
            elif verb == "LIST":
                proto.ok(f"{cmd.msg} {entry.size}")
            elif verb == "UIDL":
                proto.ok(f"{cmd.msg} {entry.uid}")
            elif verb == "DELE":
                entry.deleted = True
                proto.ok(f"Message {cmd.msg} deleted")
            elif entry.size <= SMALL_MESSAGE:
                try:
                    data = drop.read(entry)
                except FileNotFoundError:
                    proto.err("Message was removed by another program", "SYS/PERM")
                    return True
                except OSError:
                    proto.err("Cannot read message, try again later", "SYS/TEMP")
                    return True
                if verb == "TOP":
                    assert cmd.lines is not None
                    top = TopFilter(cmd.lines)
                    proto.multiline("Top of message follows", dot_stuff(top.feed(data)))
                else:
                    entry.retrieved = True
                    proto.multiline(f"{entry.size} octets", dot_stuff(data))
            else:
                return False
        return True

    async def _stream(self, proto: Pop3Engine, cmd: Command) -> None:
        """RETR or TOP of a large message: read, stuff and send in pieces, with flow control.

        The file is read in a worker thread a piece at a time and each piece is written before
        the next is read, so memory stays at a few pieces whatever the message size.
        """
        drop = self.drop
        assert drop is not None and cmd.msg is not None
        entry = drop.get(cmd.msg)
        assert entry is not None
        io = self.services.io
        try:
            fh = await io.run(drop.open_message, entry)
        except FileNotFoundError:
            proto.err("Message was removed by another program", "SYS/PERM")
            return
        except OSError:
            proto.err("Cannot read message, try again later", "SYS/TEMP")
            return
        top = TopFilter(cmd.lines) if cmd.verb == "TOP" and cmd.lines is not None else None
        if top is None:
            proto.begin_multiline(f"{entry.size} octets")
        else:
            proto.begin_multiline("Top of message follows")
        stuffer = Stuffer()
        pieces = chunks(fh, CHUNK)
        try:
            while not self._lost:
                try:
                    piece = await io.run(next, pieces, b"")
                except OSError:
                    # The +OK is out: a -ERR cannot follow. Drop the connection; as after any
                    # drop, nothing is deleted (RFC 1939 §6).
                    self.services.log.exception("POP3 read of %s failed", drop.file(entry))
                    self._close()
                    return
                if not piece:
                    break
                if top is not None:
                    piece = top.feed(piece)
                proto.send_raw(stuffer.feed(piece))
                self._flush()
                if top is not None and top.done:
                    break
                if self._write_paused:
                    await self._writable.wait()
            if self._lost:
                return
            proto.send_raw(stuffer.finish())
            if top is None:
                entry.retrieved = True
        finally:
            fh.close()

    async def _quit(self, proto: Pop3Engine) -> None:
        # RFC 1939 §6: once QUIT has come the UPDATE state runs to its end, also when the
        # client closes without reading the +OK; so the maildrop (and its lock) is this
        # task's now, not connection_lost's to release half-way.
        drop, self.drop = self.drop, None
        if drop is None:
            proto.bye()
            return
        try:
            failed = await self.services.io.run(drop.update)
        finally:
            drop.close()
        if failed:
            proto.bye(False, f"[SYS/TEMP] {failed} messages were not removed")
        else:
            proto.bye(True, "Bye")

    # -- AUTHORIZATION -------------------------------------------------------------------------

    async def _login(self, proto: Pop3Engine, user: str, password: str) -> None:
        services = self.services
        self._mech_name = "USER"
        if services.throttle.refused(self.client_ip):
            events.login_throttled(self.service, self.client_ip)
            proto.login_failed("Too many failed logins, try again later", "SYS/TEMP")
            return
        key = await services.check_password(self.client_ip, user, password)
        if key is None:
            await self._failed(proto, user)
            return
        await self._open(proto, key)

    async def _failed(self, proto: Pop3Engine, user: str | None) -> None:
        # Counted per account too, case-insensitively (logins are), so that spelling the
        # name differently does not reset the count.
        account = user.strip().lower()[:320] if user else None
        delay = self.services.throttle.failure(self.client_ip, account)
        events.auth_failed(self.service, self.client_ip, account, self._mech_name)
        await asyncio.sleep(delay)
        proto.login_failed("Invalid login or password", "AUTH")

    async def _open(self, proto: Pop3Engine, key: str) -> None:
        path = maildir.mailbox_path(self.services.cfg.data_dir, key)
        drop = Maildrop(path)
        try:
            await self.services.io.run(drop.open)
        except MailboxInUse:
            proto.login_failed("Mailbox is locked by another session", "IN-USE")
            return
        except OSError:
            proto.login_failed("Cannot open mailbox, try again later", "SYS/TEMP")
            return
        if self._lost:
            drop.close()
            return
        self.drop = drop
        self.user = key
        count, size = drop.stat()
        events.pop3_login(self.service, self.client_ip, key, count)
        proto.login_ok(f"{count} messages ({size} octets)")

    async def _auth(self, proto: Pop3Engine, event: AuthStart | AuthResponse) -> None:
        if isinstance(event, AuthStart):
            if self.services.throttle.refused(self.client_ip):
                events.login_throttled(self.service, self.client_ip)
                proto.login_failed("Too many failed logins, try again later", "SYS/TEMP")
                return
            self._mech_name = event.mechanism.upper()[:32]
            self._mech = sasl.new_mechanism(event.mechanism)
            assert self._mech is not None
            step = self._mech.start(event.initial)
        else:
            assert self._mech is not None
            step = self._mech.step(event.data)
        step = await sasl.settle(
            self._mech,
            step,
            functools.partial(self.services.check_password, self.client_ip),
            functools.partial(self.services.scram_keys, self.client_ip),
        )
        if isinstance(step, sasl.Challenge):
            proto.auth_challenge(step.data)
            return
        if isinstance(step, sasl.Success):
            if step.final is not None:
                # SCRAM's server-final; the client's (empty) answer completes the mechanism.
                proto.auth_challenge(step.final)
                return
            self._mech = None
            await self._open_login(proto, step.username)
            return
        self._mech = None
        if step.malformed:
            proto.login_failed("Malformed authentication exchange", None)
            return
        await self._failed(proto, step.username)

    async def _open_login(self, proto: Pop3Engine, username: str) -> None:
        try:
            key = parse_user_address(username).key
        except AddressError:
            await self._failed(proto, username)
            return
        await self._open(proto, key)

    async def _starttls(self, proto: Pop3Engine) -> None:
        transport = self.transport
        assert transport is not None and self.services.tls is not None
        # The checked invariant of the upgrade (RFC 2595 §4, CVE-2011-0411): reading was
        # paused before the +OK went out, and the engine dropped what had been pipelined, so
        # no plaintext octet can be read as if it had come over TLS.
        if proto.pending_input() or not self._read_paused:
            self.services.log.error("POP3 STLS with %s: input left at the switch", self.client_ip)
            self._close()
            return
        if await refuses_old_tls(transport, self.services.cfg.limits.tls_handshake_timeout):
            self._close()  # a TLS 1.0/1.1-only client: refused with protocol_version
            return
        # From here on, data_received is fed by the TLS layer only (start_tls swaps the
        # transport's protocol before it reads again).
        self._tls_early = []
        try:
            new = await asyncio.get_running_loop().start_tls(
                transport,
                self,
                self.services.tls,
                server_side=True,
                ssl_handshake_timeout=self.services.cfg.limits.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._tls_early = None
            events.tls_handshake(self.service, self.client_ip, None, str(exc) or type(exc).__name__)
            self._close()
            return
        early, self._tls_early = self._tls_early, None
        if new is None:
            self._close()
            return
        events.tls_handshake(self.service, self.client_ip, tls_version(new), None)
        self.transport = new
        self._read_paused = False
        proto.tls_active = True
        proto.tls_started(self.features())
        proto.receive_data(b"".join(early))

    # -- time-outs and shutdown ----------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        proto = self.proto
        if proto is None or self._lost:
            return
        # RFC 1939 §3: at least 10 minutes of inactivity before an autologout.
        idle = now - self.last_activity > self.services.cfg.limits.pop3_idle_timeout
        if self._write_paused:
            # A client that stopped reading (in the middle of a RETR, say): nothing can be
            # said to it any more; drop it once stuck for as long. Nothing is deleted.
            if idle and self.transport is not None:
                self.transport.abort()
            return
        if self._task is not None:
            return  # a login being checked or QUIT being applied: it ends by itself
        if idle:
            proto.close("Autologout: idle for too long")
            self._flush()
            self._close()

    def shutdown(self) -> None:
        """Server stopping: an idle session gets -ERR and is closed (deleting nothing); a busy
        one (a login being checked, a RETR being sent, QUIT being applied) finishes that first.
        """
        proto = self.proto
        if proto is None or self._lost:
            return
        if self._task is not None:
            self._stopping = True
            return
        proto.close("Server shutting down", "SYS/TEMP")
        self._flush()
        self._close()
