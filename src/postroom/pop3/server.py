"""asyncio glue for the POP3 listeners (110 with STLS, 995 with implicit TLS, RFC 8314).

What every connection needs (limits, flow control, TLS, time-outs, shutdown) is in
:mod:`postroom.connection`; the mailbox is seen only through the
:class:`~postroom.storage.interfaces.Maildrop` interface (``services.maildrops``), so this module
touches no file. TRANSACTION commands are answered inside ``data_received`` (a small message
comes from :meth:`Maildrop.read_now`); logins (argon2, the mailbox lock and snapshot), large
RETRs and QUIT's UPDATE run as a task while further input waits in the engine's buffer. RETR
streams a large message in pieces with flow control, so a 50 MB message is never held in memory
twice. Failed logins are answered after the throttle's delay, the same way for an unknown user
and a wrong password (``sasl_session.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from postroom import events, sasl
from postroom.address import parse_user_address
from postroom.connection import Connection
from postroom.errors import AddressError, LockedOut, MailboxInUse, PasswordUncheckable
from postroom.pop3.engine import Command, Pop3Engine, Pop3Features, Pop3State, Quit, UserPass
from postroom.pop3.maildrop import Snapshot, TopFilter
from postroom.sasl_session import SaslSession
from postroom.storage.interfaces import Maildrop
from postroom.wire.events import AuthResponse, AuthStart
from postroom.wire.framing import Stuffer, dot_stuff_parts

if TYPE_CHECKING:
    from postroom.services import Services

_SASL_REFUSED = {
    "throttled": ("Too many failed logins, try again later", "SYS/TEMP"),
    "mechanism": ("Unsupported authentication mechanism", None),
    "malformed": ("Malformed authentication exchange", None),
    "credentials": ("Invalid login or password", "AUTH"),
    "unavailable": ("Temporary authentication failure, try again later", "SYS/TEMP"),
}


class Pop3Connection(Connection):
    """One POP3 client connection."""

    kind = "POP3"
    read_high_water = 1 << 16

    engine: Pop3Engine | None

    def __init__(self, services: Services, implicit_tls: bool) -> None:
        super().__init__(services, implicit_tls)
        self.drop: Maildrop | None = None
        self.snapshot: Snapshot | None = None
        self.user: str | None = None
        self.service = "pop3s" if implicit_tls else "pop3"
        self._sasl = SaslSession(services, "", self.service)
        self._closing: set[asyncio.Task[None]] = set()
        self._streaming = False  # a large RETR or TOP is being sent (_stream)

    def features(self) -> Pop3Features:
        tls = self.implicit_tls or (self.engine is not None and self.engine.tls_active)
        limits = self.limits
        return Pop3Features(
            starttls=self.services.tls is not None and not tls,
            login_allowed=tls or self.services.cfg.auth.allow_plaintext,
            max_errors=limits.max_errors,
            max_commands=limits.max_commands,
        )

    def refusal(self) -> bytes:
        return b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"

    def begin(self) -> bytes:
        self.engine = Pop3Engine(self.features(), tls_active=self.implicit_tls)
        self._sasl.client_ip = self.client_ip
        return b"+OK postroom POP3 server ready\r\n"

    def handle(self, event: object) -> Coroutine[Any, Any, None] | None:
        engine = self.engine
        assert engine is not None
        if isinstance(event, Command):
            return None if self._command(engine, event) else self._stream(engine, event)
        if isinstance(event, UserPass):
            return self._login(engine, event.user, event.password)
        if isinstance(event, AuthStart | AuthResponse):
            return self._auth(engine, event)
        if isinstance(event, Quit):
            return self._quit(engine)
        return None

    def tls_started(self) -> None:
        assert self.engine is not None
        self.engine.tls_active = True
        self.engine.tls_started(self.features())

    def final_words(self, why: str) -> None:
        assert self.engine is not None
        if why == "timeout":
            self.engine.close("Autologout: idle for too long")  # RFC 1939 §3
        elif why == "shutdown":
            self.engine.close("Server shutting down", "SYS/TEMP")
        else:
            self.engine.close("Internal error", "SYS/TEMP")

    def idle_limit(self) -> float:
        # RFC 1939 §3: at least 10 minutes of inactivity before an autologout.
        return self.limits.pop3_idle_timeout

    def session_limit(self) -> float | None:
        """Until it logs in, a session has ``pop3_idle_timeout`` in all: every octet restarts
        the idle clock, so a client trickling bytes (or repeating CAPA) would otherwise hold
        its connection for ever without an account."""
        engine = self.engine
        if engine is None or engine.state in (Pop3State.TRANSACTION, Pop3State.UPDATE):
            return None
        return self.limits.pop3_idle_timeout

    def released(self) -> None:
        """A dropped connection deletes nothing (RFC 1939 §6): just unlock."""
        drop, self.drop = self.drop, None
        if drop is not None:
            task = asyncio.get_running_loop().create_task(drop.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- TRANSACTION ---------------------------------------------------------------------------

    def _command(self, engine: Pop3Engine, cmd: Command) -> bool:
        """Answer a TRANSACTION command at once; False if it needs a task (a large message)."""
        snap, drop = self.snapshot, self.drop
        assert snap is not None and drop is not None
        verb = cmd.verb
        if verb == "NOOP":
            engine.ok()
        elif verb == "STAT":
            count, size = snap.stat()
            engine.ok(f"{count} {size}")  # RFC 1939 §5: exactly "+OK nn mm"
        elif verb == "RSET":
            snap.reset()
            count, size = snap.stat()
            engine.ok(f"{count} messages ({size} octets)")
        elif cmd.msg is None:  # LIST or UIDL of the whole mailbox
            if verb == "LIST":
                count, size = snap.stat()
                engine.multiline(f"{count} messages ({size} octets)", snap.listing(uids=False))
            else:
                engine.multiline("Unique-ID listing follows", snap.listing(uids=True))
        else:
            number = cmd.msg
            info = snap.get(number)
            if info is None:
                engine.err("No such message")
            elif verb == "LIST":
                engine.ok(f"{number} {info.size}")
            elif verb == "UIDL":
                engine.ok(f"{number} {info.uid}")
            elif verb == "DELE":
                snap.delete(number)
                engine.ok(f"Message {number} deleted")
            else:
                try:
                    data = drop.read_now(number)
                except OSError as exc:
                    _unreadable(engine, exc)
                    return True
                if data is None:
                    return False
                if verb == "TOP":
                    assert cmd.lines is not None
                    engine.multiline(
                        "Top of message follows",
                        *dot_stuff_parts(TopFilter(cmd.lines).feed(data)),
                    )
                else:
                    snap.retrieved(number)
                    engine.multiline(f"{info.size} octets", *dot_stuff_parts(data))
                # Out at once, not batched with what follows: a client that pipelines RETRs
                # and does not read must find the writes paused after one answer, not after
                # all of them have been read into memory (flow control in the glue).
                self._flush()
        return True

    async def _stream(self, engine: Pop3Engine, cmd: Command) -> None:
        """RETR or TOP of a large message: read, stuff and send in pieces, with flow control.

        Each piece is written before the next is read, so memory stays at a few pieces
        whatever the message size."""
        snap, drop = self.snapshot, self.drop
        assert snap is not None and drop is not None and cmd.msg is not None
        info = snap.get(cmd.msg)
        assert info is not None
        pieces = drop.chunks(cmd.msg)
        self._streaming = True
        try:
            try:
                first = await anext(pieces, b"")
            except OSError as exc:
                _unreadable(engine, exc)
                return
            top = TopFilter(cmd.lines) if cmd.verb == "TOP" and cmd.lines is not None else None
            engine.begin_multiline("Top of message follows" if top else f"{info.size} octets")
            stuffer = Stuffer()
            piece = first
            while piece and not self._lost:
                if top is not None:
                    piece = top.feed(piece)
                engine.send_raw(stuffer.feed(piece))
                self._flush()
                if top is not None and top.done:
                    break
                await self.until_writable()
                try:
                    piece = await anext(pieces, b"")
                except OSError:
                    # The +OK is out: a -ERR cannot follow. Drop the connection; as after any
                    # drop, nothing is deleted (RFC 1939 §6).
                    self.log.exception("POP3 read of message %d failed", cmd.msg)
                    self._close()
                    return
            if self._lost:
                return
            engine.send_raw(stuffer.finish())
            if top is None:
                snap.retrieved(cmd.msg)
        finally:
            self._streaming = False
            await pieces.aclose()

    def cut_task_short(self) -> bool:
        if not self._streaming or self.transport is None:
            return False
        self.log.info(
            "%s with %s: cut off by the stop before its answer was whole",
            self.kind,
            self.client_ip,
        )
        self.transport.abort()  # (as after any drop, nothing is deleted: RFC 1939 §6)
        return True

    async def _quit(self, engine: Pop3Engine) -> None:
        # RFC 1939 §6: once QUIT has come the UPDATE state runs to its end, also when the
        # client closes without reading the +OK (connection_lost leaves a running task be).
        drop, snap, self.drop = self.drop, self.snapshot, None
        if drop is None or snap is None:
            engine.bye()
            return
        try:
            failed = await drop.update(snap.deleted(), snap.seen())
        finally:
            await drop.close()
        if failed:
            engine.bye(False, f"[SYS/TEMP] {failed} messages were not removed")
        else:
            engine.bye(True, "Bye")

    # -- AUTHORIZATION -------------------------------------------------------------------------

    async def _login(self, engine: Pop3Engine, user: str, password: str) -> None:
        services = self.services
        self._sasl.mechanism = "USER"
        if self._sasl.locked_out():
            engine.login_failed("Too many failed logins, try again later", "SYS/TEMP")
            return
        try:
            key = await services.check_password(self.client_ip, user, password)
        except LockedOut:  # while it waited for its check: not the password's fault
            events.login_throttled(self.service, self.client_ip)
            engine.login_failed(*_SASL_REFUSED["throttled"])
            return
        except PasswordUncheckable:  # argon2 failed (memory): not the password's fault either
            engine.login_failed(*_SASL_REFUSED["unavailable"])
            return
        if key is None:
            await self._sasl.failed(user)
            engine.login_failed("Invalid login or password", "AUTH")
            return
        await self._open(engine, key)

    async def _auth(self, engine: Pop3Engine, event: AuthStart | AuthResponse) -> None:
        outcome = await self._sasl.step(event)
        if isinstance(outcome, sasl.Challenge):
            engine.auth_challenge(outcome.data)
            return
        if isinstance(outcome, sasl.Success):
            try:
                key = parse_user_address(outcome.username).key
            except AddressError:
                await self._sasl.failed(outcome.username)
                engine.login_failed("Invalid login or password", "AUTH")
                return
            await self._open(engine, key)
            return
        engine.login_failed(*_SASL_REFUSED[outcome.reason])

    async def _open(self, engine: Pop3Engine, key: str) -> None:
        drop = self.services.maildrops.maildrop(key)
        try:
            messages = await drop.open()
        except MailboxInUse:
            events.pop3_in_use(self.service, self.client_ip, key)
            engine.login_failed("Mailbox is locked by another session", "IN-USE")
            return
        except OSError as exc:
            # The user is told only "try again": the admin must read why here.
            self.log.error("POP3 mailbox of %s cannot be opened: %s", key, exc)
            engine.login_failed("Cannot open mailbox, try again later", "SYS/TEMP")
            return
        if self._lost:
            await drop.close()
            return
        self.drop, self.snapshot, self.user = drop, Snapshot(messages), key
        count, size = self.snapshot.stat()
        events.pop3_login(
            self.service, self.client_ip, key, count, self._sasl.mechanism, self.tls_version
        )
        engine.login_ok(f"{count} messages ({size} octets)")


def _unreadable(engine: Pop3Engine, exc: OSError) -> None:
    """The answer to RETR/TOP of a message that cannot be read (RFC 2449 §8 response codes)."""
    if isinstance(exc, FileNotFoundError):
        engine.err("Message was removed by another program", "SYS/PERM")
    else:
        engine.err("Cannot read message, try again later", "SYS/TEMP")
