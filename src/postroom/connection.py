"""The asyncio glue that the SMTP and POP3 servers share: one connection, from accept to close.

A :class:`Connection` owns the transport and one sans-I/O engine, and does what is the same for
both protocols: the connection limits at accept, feeding bytes in and writing replies out (all
replies of one batch in one write), flow control both ways, TLS, time-outs and graceful
shutdown. The protocol subclasses (``smtp/server.py``, ``pop3/server.py``) only turn engine
events into answers. Events are answered inside ``data_received`` when that needs no waiting
(almost all); the rest run as one task at a time, while further input waits in the engine.

TLS is done here with ``ssl.MemoryBIO`` (RFC 8314 implicit TLS, and STARTTLS/STLS, RFC 3207
§4.2, RFC 2595 §4) rather than by asyncio's SSL transport, so that this module owns every
buffer: the switch happens within the call that handled the STARTTLS command, right after the
plaintext ``220``/``+OK`` is written, with the checked invariant that no plaintext octet is
buffered anywhere (the engine discarded what was pipelined; the glue keeps no buffer of its
own), which closes the CVE-2011-0411 class of bugs by construction. It also lets a client that
ends with ``close_notify`` (or a TCP FIN) right after pipelining its commands get all its
answers before the connection closes, lets a failed handshake send its alert, and makes every
listener use the context in force when the connection arrives (a reloaded certificate included).

Events of a connection's life each happen in one place here, which reports it
(:mod:`postroom.events`): made or refused (:meth:`connection_made`), TLS handshake done or
failed (:meth:`_handshake_done`, :meth:`_tls_failed`), lost (:meth:`connection_lost`, with the
octets each way).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl
import struct
import termios
import time
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from postroom import events, logs
from postroom.services import descriptors_short
from postroom.wire.buffers import OUTBOX_PARTS
from postroom.wire.events import FLUSH, NEED_DATA, Closing, StartTLS

if TYPE_CHECKING:
    from postroom.config import LimitsConfig
    from postroom.services import Services

TLS_READ = 1 << 16
LARGE_PART = 1 << 12  # parts at least this large are written without joining them
# A client refused on an implicit-TLS port gets its refusal after a handshake, which must end
# within REFUSAL_TLS_TIMEOUT seconds (or [limits] tls_handshake_timeout, if shorter); at most
# REFUSAL_TLS_MAX such handshakes run at once in a worker, and beyond them a refused client is
# closed without a word (docs/operations.md).
REFUSAL_TLS_TIMEOUT = 5.0
CLOSE_GRACE = 10.0  # seconds a closing connection has to read its last replies
CLOSE_POLL = 0.25  # how often a closing connection's reading is looked at (see _close)
CLOSE_QUEUE = 1 << 16  # octets left to send at a close beyond which it waits for them (above)
READ_PROGRESS = 1 << 14  # octets a client takes in between two looks to count as reading
REFUSAL_TLS_MAX = 8
# Replies one session makes in a turn of the event loop before it lets the others run: a
# client that pipelines without reading its replies (its buffers hold megabytes of them) had
# its whole megabyte of commands run at once, and a hundred such clients held every other
# session, and new connections, for 20 s. RFC 2920 §3 lets a server pace pipelined input.
# A session with more than a turn's worth waits for its next turn in a queue, and the loop
# gives one turn per iteration (:class:`Turns`): an iteration is where the loop reads what
# the other sessions sent and accepts a connection (libuv, under uvloop, accepts one per
# iteration), so it never waits for more than a turn, however many sessions flood. A turn
# for each of them per iteration had made an iteration last as long as all their turns, and
# a client that connected behind a hundred of them waited 15 s for its 220.
# A client that reads sees no change (a longer pipeline takes a few iterations, alone in
# the queue); nor does one that ends its pipeline with a FIN (eof_received: all is answered).
# One that closes without reading resets the connection (RFC 1122 §4.2.2.13: data was lost),
# and what was not run by then never is, a QUIT too: a POP3 session then deletes nothing
# (RFC 1939 §6), as when the reset comes during a password check. A turn is large enough
# that this takes a pipeline of over a thousand commands: a client that sends a few hundred
# DELEs and QUIT and closes at once still has them all done (with 256, it had none).
# An event counts one; FLUSH, the batch of OUTBOX_PARTS replies the engine made without an
# event, counts as many.
REPLIES_PER_TURN = 1024
_RESET = struct.pack("ii", 1, 0)  # struct linger {on, 0 s}: close(2) sends RST


class Engine(Protocol):
    """What the glue needs of a sans-I/O engine."""

    @property
    def closed(self) -> bool: ...

    @property
    def state(self) -> str: ...

    def receive_data(self, data: bytes) -> None: ...

    def pending_input(self) -> int: ...

    def data_to_send(self) -> bytes: ...

    def parts_to_send(self) -> list[bytes]: ...

    def next_event(self) -> object: ...


class TlsLayer:
    """Server-side TLS over memory buffers: ciphertext in, plaintext out, and back."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.ready = False  # the handshake is done
        self.peer_closed = False  # the client sent close_notify

    def feed(self, data: bytes) -> bytes:
        """Ciphertext from the client -> the plaintext it carried (maybe b"").

        Raises ``ssl.SSLError`` for a failed handshake or a broken record; :meth:`outgoing`
        then holds the alert to send."""
        self._incoming.write(data)
        if not self.ready:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.ready = True
        parts = []
        obj, incoming = self.obj, self._incoming
        try:
            while True:
                chunk = obj.read(TLS_READ)
                if not chunk:
                    self.peer_closed = True  # read() returns b"" at close_notify
                    break
                parts.append(chunk)
                if not incoming.pending and not obj.pending():
                    break  # all read (saves the SSLWantReadError of one more read)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def outgoing(self) -> bytes:
        """Ciphertext to send (handshake messages, alerts, session tickets)."""
        return self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self._outgoing.read()

    def encrypt_all(self, parts: list[bytes]) -> bytes:
        for data in parts:
            self.obj.write(data)
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.obj.unwrap()
        return self._outgoing.read()


class Connection(asyncio.Protocol):
    """One client connection; subclasses make the engine and answer its events."""

    kind = "connection"  # "SMTP" or "POP3" in logs
    service = "connection"  # the listener: smtp, submission, submissions, pop3, pop3s
    read_high_water = 1 << 16  # stop reading while the engine holds more unread input
    refusing: ClassVar[int] = 0  # refusal handshakes under way in this process

    engine: Engine | None

    @property
    def log(self) -> logging.Logger:
        return events.logger(self.service)

    def __init__(self, services: Services, implicit_tls: bool) -> None:
        self.services = services
        # The time-outs of the session: those of its start (a reload applies to the next one).
        self.limits: LimitsConfig = services.cfg.limits
        self.implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.tls: TlsLayer | None = None
        self.engine = None
        self.client_ip = ""
        # The idle clocks: ``last_activity`` restarts when the client makes progress (a reply
        # to a whole command, a reply it drained, a task done); ``last_received`` at every
        # octet, which counts only while a message streams in (busy()). A client trickling a
        # command one octet at a time thus gets ``command_timeout`` for the whole line, as
        # Postfix's smtpd_per_record_deadline does, not one per octet (RFC 5321 §4.5.3.2.7).
        self.started = self.last_activity = self.last_received = 0.0
        self._lost = False
        self._gone = False  # connection_lost came
        self._eof = False
        self._ended_here = False  # we closed it, the client had not (for lost_after)
        self._read_paused = False
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._released = False
        self._tls_since = 0.0
        # (octets left for the client, when): the last look at whether it reads on
        self._look: tuple[int, float] | None = None
        self._greeting: bytes | None = None  # held back until the implicit TLS handshake
        self.received = self.sent = 0  # octets on the wire, for the metrics
        self._handshake_failed = False
        self._refusal: asyncio.TimerHandle | None = None  # a refusal waiting for its handshake
        self._waiting = False  # in the queue of turns (Turns): more events to run

    # -- what a protocol provides --------------------------------------------------------------

    def refusal(self) -> bytes:
        """The answer to a connection over the limits (or during shutdown)."""
        raise NotImplementedError

    def begin(self) -> bytes:
        """Make the engine (and the protocol's session state); returns the greeting."""
        raise NotImplementedError

    def handle(self, event: object) -> Coroutine[Any, Any, None] | None:
        """Answer an engine event; a coroutine if the answer must wait (run as the task)."""
        raise NotImplementedError

    def tls_started(self) -> None:
        """The STARTTLS/STLS handshake is done: reset the engine and session (RFC 3207 §4.2)."""
        raise NotImplementedError

    def final_words(self, why: str) -> None:
        """Queue the engine's last reply before we close: ``timeout`` or ``shutdown``."""
        raise NotImplementedError

    def idle_limit(self) -> float:
        """Seconds of silence allowed in the current state."""
        raise NotImplementedError

    def session_limit(self) -> float | None:
        """Seconds a whole session may last, or None."""
        return None

    def busy(self) -> bool:
        """A message's octets are coming in: every octet received restarts the idle clock."""
        return False

    def holds_message(self) -> bool:
        """In the middle of a message that a stop should let finish (its octets coming in,
        or between two of its chunks)."""
        return self.busy()

    def cut_task_short(self) -> bool:
        """The stop's grace ran out with a task running: end it now if it may be ended (it
        stores and applies nothing yet: a long answer, checks), saying so; True if it was.
        The session's disconnect is logged when it ends."""
        return False

    def released(self) -> None:
        """The connection is gone: drop the protocol's session state (nothing is applied)."""

    # -- asyncio.Protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        services = self.services
        sock = transport.get_extra_info("socket")
        fileno = sock.fileno() if sock is not None else -1  # descriptors running short: 421
        if services.stopping or not services.connections.acquire(self.client_ip, self, fileno):
            self._lost = True
            why = "stopping" if services.stopping else "connection_limit"
            events.connection_refused(self.service, self.client_ip, why)
            if not self.implicit_tls:
                transport.write(self.refusal())  # type: ignore[attr-defined]
            elif self._refuse_after_handshake(fileno):
                return
            transport.close()
            return
        self.started = self.last_activity = self.last_received = time.monotonic()
        events.connected(self.service, self.client_ip)
        greeting = self.begin()
        if self.implicit_tls:
            self._greeting = greeting  # it follows the handshake
            self._start_tls()
        else:
            self._write(greeting)

    def data_received(self, data: bytes) -> None:
        if self._lost or self.engine is None:
            if self._refusal is not None:
                self._refusal_handshake(data)
            return  # closing: input is dropped
        self.last_received = time.monotonic()
        self.received += len(data)
        tls = self.tls
        if tls is not None:
            was_ready = tls.ready
            try:
                data = tls.feed(data)
            except ssl.SSLError as exc:
                self._tls_failed(str(exc))
                return
            out = tls.outgoing()
            if out and self.transport is not None:
                self.sent += len(out)
                self.transport.write(out)
            if not tls.ready:
                return
            if not was_ready:
                self._handshake_done()
            if tls.peer_closed:
                self._eof = True
        engine = self.engine
        if data:
            engine.receive_data(data)
        if self._task is None and not self._write_paused:
            self._process()
        if (
            not self._lost
            and not self._read_paused
            and engine.pending_input() > self.read_high_water
        ):
            self._pause_reading()

    def eof_received(self) -> bool | None:
        # Keep the transport open (a plain TCP transport: TLS is ours): answer what the client
        # pipelined before its FIN, then close.
        if self._lost or self.engine is None:
            return None
        self._eof = True
        if self._task is None and not self._write_paused:
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._refusal_ended("closed by the client")
        self._lost = True
        self._writable.set()
        self.services.connections.release(self.client_ip, self)
        if self.engine is not None:
            if self.tls is not None and not self.tls.ready and not self._handshake_failed:
                # (We close one at a stop: a session not yet talking gets no reply.)
                why = "closed by the server's stop" if self._ended_here else "closed by the client"
                events.tls_handshake(self.service, self.client_ip, None, why)
            seconds = time.monotonic() - self.started
            after = ""  # where the client left a session it did not end
            if not (self.engine.closed or self._ended_here):
                handshaking = self.tls is not None and not self.tls.ready
                after = "TLS" if handshaking else str(self.engine.state)
            events.disconnected(
                self.service, self.client_ip, self.received, self.sent, seconds, after
            )
        if self._task is None:
            self._release()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop executing its commands until it does.
        self._write_paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.last_activity = time.monotonic()  # the client is reading: it is not idle
        self._writable.set()
        if self._task is None and not self._lost and self.engine is not None:
            self._process()

    # -- processing ----------------------------------------------------------------------------

    def _process(self) -> None:
        """Run engine events until it needs input, an event needs a task, or the turn is over
        (:data:`REPLIES_PER_TURN`: the rest follows once the other sessions had theirs)."""
        engine = self.engine
        assert engine is not None
        turn = REPLIES_PER_TURN
        try:
            while not self._lost:
                if turn <= 0:
                    self._yield_turn()
                    return
                turn -= 1
                event = engine.next_event()
                if event is NEED_DATA:
                    self._flush()
                    if engine.closed or self._eof:
                        self._close()
                    elif self._stopping and not self.holds_message():
                        self.shutdown()  # the message it was let finish was given up
                    elif engine.pending_input() <= self.read_high_water:  # (as data_received)
                        self._resume_reading()
                    return
                if event is FLUSH:
                    # Many replies (or a long one) queued: sent now, and no more commands
                    # read while the client does not read them (resume_writing goes on).
                    self._flush()
                    if self._write_paused:
                        self._pause_reading()
                        return
                    turn -= OUTBOX_PARTS - 1
                    continue
                if isinstance(event, Closing):
                    self._flush()
                    self._close(linger=not event.clean)
                    # The session is over now, not when the socket closes (up to 2 s later
                    # when it lingers): a POP3 mailbox is free for the next login at once.
                    if self._task is None:
                        self._release()
                    return
                if isinstance(event, StartTLS):
                    self._flush()  # the 220/+OK, in plaintext
                    self._start_tls()
                    continue
                work = self.handle(event)
                if work is not None:
                    self._flush()
                    self._task = asyncio.get_running_loop().create_task(self._wait(work))
                    return
                if self._write_paused:
                    # A client that pipelines faster than it reads: go on when its buffer
                    # drains (resume_writing), holding at most an outbox here (see FLUSH).
                    self._flush()
                    self._pause_reading()
                    return
        except Exception:
            self._crashed()

    def _yield_turn(self) -> None:
        """Let the other sessions run; this one goes on when its turn comes (:class:`Turns`)."""
        self._flush()
        self._pause_reading()  # resumed when its input runs low (NEED_DATA)
        if not self._waiting:
            self._waiting = True
            Turns.of(asyncio.get_running_loop()).add(self)

    def another_turn(self) -> None:
        """Its turn has come (from :class:`Turns`)."""
        self._waiting = False
        if self._task is None and not self._lost and not self._write_paused:
            self._process()

    async def _wait(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            self._task = None
            self._crashed()
            return
        self._task = None
        self.last_activity = time.monotonic()
        if self._lost:
            self._release()
        elif self._stopping:
            self.shutdown()
        elif not self._write_paused:
            self._process()

    async def until_writable(self) -> None:
        """For a task that streams: wait while the client's buffer is full."""
        if self._write_paused:
            await self._writable.wait()

    def _crashed(self) -> None:
        self.log.exception("%s session with %s failed", self.kind, self.client_ip)
        engine = self.engine
        if engine is not None and not self._lost:
            with contextlib.suppress(Exception):
                self.final_words("error")
                self._flush()
        self._close()
        if self._task is None:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.released()

    # -- bytes out -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._lost or not data:
            return
        tls = self.tls
        if tls is not None:
            if not tls.ready:
                return  # nothing can be said before the handshake
            data = tls.encrypt(data)
        self.sent += len(data)
        transport.write(data)

    def _flush(self) -> None:
        """Write what the engine has queued: all replies of one batch in one system call,
        and a large message (RETR) without copying it into one buffer first."""
        if self.engine is None:
            return
        parts = self.engine.parts_to_send()
        if not parts:
            return
        if self.last_received > self.last_activity:
            self.last_activity = self.last_received  # a reply: the client's command was whole
        if len(parts) == 1:
            self._write(parts[0])
        elif parts:
            if max(map(len, parts)) < LARGE_PART:
                self._write(b"".join(parts))  # pipelined replies: one small buffer
                return
            transport, tls = self.transport, self.tls
            if transport is None or self._lost:
                return
            if tls is None:
                self.sent += sum(map(len, parts))
                transport.writelines(parts)  # one writev, no copy
            elif tls.ready:
                data = tls.encrypt_all(parts)
                self.sent += len(data)
                transport.write(data)

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._lost and not self._read_paused:
            self.transport.pause_reading()
            self._read_paused = True

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()

    def _close(self, linger: bool = False) -> None:
        """Close; with ``linger``, half-close first and drop input for a moment, so that a client
        still sending (pipelined garbage) reads our last reply instead of a TCP reset."""
        transport = self.transport
        self._ended_here = self._ended_here or not (self._lost or self._eof)
        if transport is None or self._lost:
            self._lost = True
            return
        self._lost = True
        tls = self.tls
        if tls is not None and tls.ready:
            with contextlib.suppress(Exception):
                transport.write(tls.close_notify())
        loop = asyncio.get_running_loop()
        left = self._left_for_client()
        if transport.get_write_buffer_size() or left > CLOSE_QUEUE:
            # Much of our answer is still to be read, maybe by a client that never reads.
            # Closed now, the socket would be left to asyncio (for good) or to the kernel (an
            # orphan holding it for minutes), outside every limit: half-close, keep it counted,
            # and close once it is read; reset it if the client stops reading.
            if transport.can_write_eof():
                transport.write_eof()
            self._look = (left, time.monotonic())
            loop.call_later(CLOSE_POLL, self._close_when_read, transport)
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            loop.call_later(2.0, transport.close)
            return
        transport.close()

    def _close_when_read(self, transport: asyncio.Transport) -> None:
        """Every CLOSE_POLL after a close with much left to read: close once all is read (a
        stop waits for that: a client that read a large RETR in a moment was closed only
        CLOSE_GRACE later), reset a client that took in less than READ_PROGRESS within
        CLOSE_GRACE of the last look."""
        if self._gone:
            return
        left = self._left_for_client()
        look, now = self._look, time.monotonic()
        if not left:
            transport.close()
            return
        if look is not None and look[0] - left >= READ_PROGRESS:
            self._look = (left, now)
        elif look is None or now - look[1] >= CLOSE_GRACE:
            self._reset("not reading its last replies")
            return
        asyncio.get_running_loop().call_later(CLOSE_POLL, self._close_when_read, transport)

    # -- TLS -----------------------------------------------------------------------------------

    def _refuse_after_handshake(self, fileno: int) -> bool:
        """A refused client of an implicit-TLS port: nothing can be said to it before a
        handshake, so do one, within REFUSAL_TLS_TIMEOUT, then send the refusal (see
        :meth:`_refusal_handshake`). False (close without a word) while descriptors run short
        or REFUSAL_TLS_MAX such handshakes are under way: what a flood of refused clients
        costs stays bounded."""
        context = self.services.tls
        if context is None or Connection.refusing >= REFUSAL_TLS_MAX or descriptors_short(fileno):
            return False
        assert self.transport is not None
        Connection.refusing += 1
        self.tls = TlsLayer(context)
        loop = asyncio.get_running_loop()
        limit = min(REFUSAL_TLS_TIMEOUT, self.limits.tls_handshake_timeout)
        self._refusal = loop.call_later(limit, self._refusal_timed_out)
        return True

    def _refusal_timed_out(self) -> None:
        self._refusal_ended("handshake timed out")
        if self.transport is not None:
            self.transport.close()

    def _refusal_ended(self, error: str | None) -> None:
        """The refusal's handshake is over (``error`` None: done): free its slot, count it."""
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
            Connection.refusing -= 1
            events.tls_handshake(self.service, self.client_ip, self.tls_version, error)

    def _refusal_handshake(self, data: bytes) -> None:
        """Handshake bytes of a refused client; once it is done, the refusal and close_notify.
        Nothing the client sends is read as a command."""
        tls, transport = self.tls, self.transport
        assert tls is not None and transport is not None
        try:
            tls.feed(data)
        except ssl.SSLError as exc:
            self._refusal_ended(str(exc))
            transport.write(tls.outgoing())  # the alert
            transport.close()
            return
        out = tls.outgoing()
        if tls.ready:
            self._refusal_ended(None)
            out += tls.encrypt(self.refusal()) + tls.close_notify()
        if out:
            transport.write(out)
        if tls.ready:
            transport.close()

    def _start_tls(self) -> None:
        """Switch to TLS now: every later byte from the client is TLS."""
        engine = self.engine
        context = self.services.tls
        assert engine is not None
        # The checked invariant of the switch: no plaintext read before it is left to be read
        # after it (the engine discarded what was pipelined after the command).
        if engine.pending_input() or context is None:
            self.log.error(
                "%s STARTTLS with %s: input left at the switch", self.kind, self.client_ip
            )
            self._close()
            return
        self.tls = TlsLayer(context)
        self._tls_since = time.monotonic()

    def _handshake_done(self) -> None:
        self.last_activity = time.monotonic()  # the next command's clock starts now
        events.tls_handshake(self.service, self.client_ip, self.tls_version, None)
        greeting, self._greeting = self._greeting, None
        if greeting is not None:
            self._write(greeting)
        else:
            self.tls_started()

    def _tls_failed(self, reason: str) -> None:
        tls, transport = self.tls, self.transport
        if tls is not None and not tls.ready:
            self._handshake_failed = True
            events.tls_handshake(self.service, self.client_ip, None, reason)
        else:  # a broken record after the handshake
            events.tls_broken(self.service, self.client_ip, reason)
        if tls is not None and transport is not None and not self._lost:
            with contextlib.suppress(Exception):
                transport.write(tls.outgoing())  # the alert, so the client knows why
        self._close()

    @property
    def tls_version(self) -> str | None:
        """``TLSv1.3`` and the like once the handshake is done; None without TLS."""
        tls = self.tls
        return tls.obj.version() if tls is not None and tls.ready else None

    # -- time-outs and shutdown ----------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called about once a second by the sweeper."""
        if self.engine is None or self._lost:
            return
        tls = self.tls
        if tls is not None and not tls.ready:
            if now - self._tls_since > self.limits.tls_handshake_timeout:
                self._tls_failed("handshake timed out")
            return
        since = max(self.last_activity, self.last_received) if self.busy() else self.last_activity
        idle = now - since > self.idle_limit()
        if not idle:
            self._look = None
        elif self._reading_on(now):
            # Still taking in our last answer (a large RETR on a slow link), though it left
            # our buffers long ago: not idle (RFC 1939 §3: an inactivity timer).
            idle = False
        if idle and self._look is not None:
            # Our answer sat unread for a whole look after the time-out: nothing can be said
            # to this client any more (a reply would wait behind the rest), so drop it.
            self._reset("not reading its replies")
            return
        if self._write_paused:
            return  # it reads on: resume_writing goes on
        if self._task is not None:
            return  # a login being checked, a message being stored: it ends by itself
        limit = self.session_limit()
        if idle or (limit is not None and now - self.started > limit):
            self.final_words("timeout")
            self._flush()
            self._close()

    def _left_for_client(self) -> int:
        """Octets of ours the client has not taken in: in our buffers, and in the kernel's
        (SIOCOUTQ: not yet sent, or not acknowledged)."""
        transport = self.transport
        if transport is None:
            return 0
        left = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
                left += int(struct.unpack("i", buf)[0])
        return left

    def _reading_on(self, now: float) -> bool:
        """Whether a client that seems idle is still taking in what we sent: at least
        READ_PROGRESS of it within CLOSE_GRACE of the last look (the first look opens that
        window). A client that reads nothing still takes a little now and then, as its
        kernel's buffer grows, hence a minimum."""
        left = self._left_for_client()
        look = self._look
        if not left:
            self._look = None
            return False
        if look is None or look[0] - left >= READ_PROGRESS:
            self._look = (left, now)
            return True
        return now - look[1] < CLOSE_GRACE

    def _reset(self, why: str) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0): closed as usual, the socket
        would stay in the kernel with what the client did not read (up to megabytes), an
        orphan in FIN-WAIT-1 probing a zero window for minutes, outside every limit (nginx's
        reset_timedout_connection does the same)."""
        transport = self.transport
        assert transport is not None
        self._ended_here = True
        self.log.info("%s with %s: reset, %s", self.kind, self.client_ip, why)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()

    def cut_off(self) -> None:
        """The stop's grace ran out and this session is still receiving a message (a task,
        storing one, is waited for): its 421 (RFC 5321 §3.8), and the disconnect is logged,
        rather than a bare close at the exit; so is a task that may be cut short."""
        if self.engine is None:
            return
        if self._lost:
            # Closed by us, its last replies still unread (the client pipelined and does not
            # read): dropped now, its disconnect logged, rather than ended by the exit.
            if not self._gone and self.transport is not None:
                self.transport.abort()
            return
        if self._task is not None:
            if self.cut_task_short():
                self._ended_here = True
            return
        self.log.info(
            "%s with %s: cut off by the stop before its message was whole",
            self.kind,
            self.client_ip,
        )
        self.final_words("shutdown")
        self._flush()
        self._close()

    def shutdown(self) -> None:
        """Server stopping: an idle session gets its last reply now; a busy one (a task, or a
        message being received) finishes that first."""
        if self.engine is None or self._lost:
            return
        if self._task is not None or self.holds_message():
            self._stopping = True
            return
        self.final_words("shutdown")
        self._flush()
        self._close()


class Turns:
    """The sessions of one event loop that wait for their next turn (:data:`REPLIES_PER_TURN`),
    in order: one of them runs per iteration of the loop, so that an iteration, where every
    other session's input is read and a connection accepted, waits for one turn at most."""

    _of: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        # Weak references, and no handle kept: nothing here may lead back to the loop (a
        # connection does, by its transport), or the loop, this dict's key, would live on
        # with its sessions after it ends. A live session is held by the connection table.
        self.waiting: deque[weakref.ref[Connection]] = deque()
        self.scheduled = False  # a turn is due in the loop's next iteration

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Turns:
        """The queue of ``loop`` (one in a worker; the tests run many loops, one at a time)."""
        turns = cls._of.get(loop)
        if turns is None:
            turns = cls._of[loop] = cls()
        return turns

    def add(self, conn: Connection) -> None:
        self.waiting.append(weakref.ref(conn))
        self._schedule()

    def _schedule(self) -> None:
        if self.waiting and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        self.scheduled = False
        try:
            conn = self.waiting.popleft()()
            if conn is not None:
                conn.another_turn()  # which may queue it again, at the end
        finally:  # (whatever a session's turn raised, the others' turns still come)
            self._schedule()


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
