"""Remote delivery: one message, one destination domain, over SMTP to its MX hosts (RFC 5321 §5.1).

:class:`RemoteDelivery` asks the :class:`~postroom.resolver.Resolver` for the domain's targets
(dropping this host and worse MX hosts, RFC 5321 §5.1, so a misrouted domain ends in 5.4.6 and not
in a loop), then tries each MX host's addresses in order on ``[delivery] port``. A refused
connection, a time-out, a TLS failure or a greeting other than 220 moves on to the next address;
recipients that get a temporary failure at one host are offered to the next one too (as Postfix does
with backup MX hosts), and so are those a host cannot take for an extension it lacks (SMTPUTF8;
8BITMIME for 8-bit header fields): they bounce only when every host tried lacks it (one that could
not be reached leaves them deferred); a 2xx or 5xx is final. The SMTP conversation itself is
:class:`~postroom.smtp.client_engine.ClientEngine`; this module only moves its bytes with an asyncio
Protocol (which owns the read side, so "nothing buffered at the TLS switch" is checked by the
engine, RFC 3207 §4.2), does the STARTTLS handshake, applies time-outs, has ``mime_downgrade`` fit
each message to the peer (short lines; 7-bit without 8BITMIME), and keeps idle sessions in a small
cache keyed by (host, address, port, verify) so that the next message to the same MX reuses the
connection (no RSET first: a connection the host dropped meanwhile fails before MAIL is answered,
and the message goes to a new connection at once). TLS is opportunistic (RFC 7435) except for
``[delivery] tls_verify_domains``, where TLS is required and the certificate must verify for the MX
host name; a failed opportunistic handshake (or plaintext sent before it) is retried once in
plaintext at the same address (like Postfix), so a broken TLS stack at the peer cannot block mail
forever. A caller may pass ``may_finish``, asked once the message is written and before its final
dot (which commits it at the remote host): on False the connection is closed without the dot (the
host cancels the transaction, RFC 5321 §3.8), no other host is tried and the attempt ends with
:class:`~postroom.errors.LeaseLost` (it records nothing: the node that holds the lease now does);
the queue of a cluster uses it to fence deliveries whose lease another node may hold.
Security notes: all network input goes through the engine; this module never interprets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from postroom import events
from postroom.config import Config
from postroom.delivery import mime_downgrade
from postroom.errors import LeaseLost
from postroom.resolver import Resolver, Target, drop_self, unmapped
from postroom.smtp.client_engine import (
    BDAT_MAX,
    ClientEngine,
    ClientState,
    Closed,
    EndOfData,
    Event,
    ForwardPath,
    MessageDone,
    Outcome,
    OutgoingMessage,
    Ready,
    TLSPolicy,
)
from postroom.tls import client_context, tls_session, tls_version
from postroom.wire.events import StartTLS
from postroom.wire.replies import Reply

MessageSource = bytes | Callable[[], Awaitable[bytes]]
"""The message octets, or a coroutine function that reads them (called only when needed)."""

MayFinish = Callable[[], bool]
"""Asked before the final dot of a message: may this transaction be committed?"""

SHUTDOWN_QUIT_WAIT = 1.0  # seconds the cached sessions' 221s are waited for at shutdown
MAX_ADDRESSES = 10  # sessions tried per delivery attempt (Postfix: smtp_mx_address_limit = 5)
UNREACHABLE_MAX = 300.0  # seconds at most an address that timed out is not dialled
DATA_BLOCK_TIMEOUT = 180.0  # RFC 5321 §4.5.3.2.5: each write of message data
DATA_BLOCK = 1024  # octets that must go within DATA_BLOCK_TIMEOUT (else a trickle holds it)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome for one recipient; ``remote_mta`` names the host that gave ``reply``, and is
    None when no host gave it (DNS failed, no connection, or a decision of ours, whose text
    then names the host)."""

    recipient: ForwardPath
    outcome: Outcome
    reply: Reply
    remote_mta: str | None = None
    dsn_offered: bool = False  # the remote host accepted NOTIFY (RFC 3461 §4.1 "relayed" if not)
    ip: str | None = None  # the address that was dialled
    # The TLS version and cipher of the session that gave ``reply``, PLAINTEXT without TLS;
    # None when no session was made (DNS failed, no connection): the log line says nothing.
    tls: str | None = None
    host: str | None = None  # the MX host dialled (also when the reply is our own words)


PLAINTEXT = "none"  # DeliveryResult.tls of a session without TLS (as its log line says)

OFF_LOOP = 256 * 1024  # octets from which a message is fitted to the next hop in a thread

FENCED = Reply(
    451,
    "4.3.0",
    ("not finished before the final dot: the lease on the message is not confirmed",),
    local=True,
)
STOPPED = Reply(
    451, "4.3.2", ("not finished before the final dot: the server is stopping",), local=True
)
NOT_TRIED = Reply(  # (no transaction was begun)
    451, "4.3.2", ("not tried: the server is stopping",), local=True
)


log = logging.getLogger("postroom")


class DotWithheld(LeaseLost):
    """A transaction cut before its final dot: the server stops (:data:`STOPPED`), or the
    lease on the message is not confirmed (:data:`FENCED`). ``reply`` says which; ``tls``
    is the session's (as in DeliveryResult; None: no host was dialled)."""

    def __init__(self, where: str, reply: Reply, tls: str | None = None) -> None:
        super().__init__(f"{where}: {reply.text}" if where else reply.text)
        self.where = where  # host[ip]; "" when none was dialled
        self.reply = reply
        self.tls = tls


class _SessionFailed(Exception):
    """No session: ``tls_failed`` if TLS failed (worth a plaintext retry), ``permanent`` if the
    host refused us with a 5xx greeting or to EHLO and HELO; ``tls``: that of the connection
    that gave ``reply`` (as in DeliveryResult: None if none was made)."""

    def __init__(
        self,
        reply: Reply,
        *,
        tls_failed: bool = False,
        permanent: bool = False,
        tls: str | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.timed_out = timed_out  # no connection, or no reply, in time: see _unreachable
        self.tls_failed = tls_failed
        self.permanent = permanent
        self.tls = tls


class _Dropped(_SessionFailed):
    """The session ended before the message went out (a host that closed a cached connection
    while the message was being converted): a new connection is tried at once."""


def _temp(status: str, text: str) -> Reply:
    """A temporary failure of our own making (no server said it)."""
    return Reply(451, status, (text,), local=True)


def _naming(reply: Reply, where: str) -> Reply:
    """A reply of our own, with the host it concerns at the front of its text."""
    return Reply(reply.code, reply.status, (f"{where}: {reply.text}",), local=True)


def _lacking_everywhere(results: list[DeliveryResult]) -> DeliveryResult:
    """The bounce of a recipient no host tried could take for an extension it lacks: the last
    host's refusal (as for other errors), naming the hosts tried before it too. The report
    blames no server for this decision of ours (no Remote-MTA, RFC 3464 §2.3.5): its
    Diagnostic-Code, in our words, is the one place that says where the message was tried."""
    last = results[-1]
    others = list(dict.fromkeys(f"{r.host}[{r.ip}]" for r in results[:-1]))
    if not others:
        return last
    hosts = ", ".join(others)
    text = f"{last.reply.text}; the other MX hosts tried lack what it needs too: {hosts}"
    return replace(last, reply=Reply(last.reply.code, last.reply.status, (text,), local=True))


# A host that gave no session: the failure, the host, the address dialled (None: not one).
_NoSession = tuple[_SessionFailed, str, str | None]


def _session_result(recipient: ForwardPath, error: _NoSession) -> DeliveryResult:
    """The result of a host that gave no session."""
    failed, host, ip = error
    reply = failed.reply
    outcome = Outcome.PERMANENT if failed.permanent else Outcome.TEMPORARY
    mta = None if reply.local else host
    return DeliveryResult(recipient, outcome, reply, mta, ip=ip, tls=failed.tls, host=host)


class _Session(asyncio.Protocol):
    """One TCP connection to one MX address, carrying a ClientEngine."""

    def __init__(self, engine: ClientEngine, host: str, ip: str, cap: float | None) -> None:
        self.engine = engine
        self.host = host
        self.ip = ip
        self.cap = cap
        self.transport: asyncio.Transport | None = None
        self.last_used = time.monotonic()
        self.generation = 0  # of the configuration it was opened under (see reconfigure)
        self.tls = PLAINTEXT  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once STARTTLS is done
        self.timed_out = False  # a reply did not come in time
        self._waiter: asyncio.Future[None] | None = None  # next_event waiting for the server
        # When the reply being waited for is too late, and engine.replies when it was set.
        self._deadline: tuple[float, int] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.engine.receive_data(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self.engine.connection_lost("connection closed by the server")
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self.engine.connection_lost(reason)
        self._wake()
        self._writable.set()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # driving the engine --------------------------------------------------------------------------
    def _limit(self, seconds: float) -> float:
        return seconds if self.cap is None else min(seconds, self.cap)

    async def flush(self) -> None:
        out = self.engine.data_to_send()
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        transport.write(out)
        # RFC 5321 §4.5.3.2.5: the 3 minutes are for each block of data the peer takes, not
        # for the whole message (a large one over a slow link took longer at every attempt
        # and never went out): the clock restarts whenever a block has gone.
        while not self._writable.is_set():
            left = transport.get_write_buffer_size()
            try:
                await asyncio.wait_for(self._writable.wait(), self._limit(DATA_BLOCK_TIMEOUT))
            except TimeoutError:
                if transport.is_closing() or left - transport.get_write_buffer_size() < DATA_BLOCK:
                    self.engine.connection_lost("time-out sending data")
                    return

    async def next_event(self) -> Event:
        loop = asyncio.get_running_loop()
        while True:
            await self.flush()
            event = self.engine.next_event()
            if event is not None:
                return event
            # RFC 5321 §4.5.3.2: the limit is on the whole reply, from when it is awaited (the
            # last reply, or the start): a server sending a byte now and then, or one line of
            # a long reply at a time, must not hold the delivery for ever.
            replies = self.engine.replies
            if self._deadline is None or self._deadline[1] != replies:
                limit = self._limit(self.engine.timeout() or 300.0)
                self._deadline = (loop.time() + limit, replies)
            # A future and a timer rather than asyncio.wait_for, which makes a task per wait:
            # several waits per relayed message. Nothing runs between the engine's answer
            # above and the waiter's start, so no input can slip by unseen.
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(self._deadline[0], _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                self.timed_out = True
                self.engine.connection_lost("time-out waiting for the server's reply")
            finally:
                timer.cancel()
                self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def quit_nowait(self) -> None:
        """Write QUIT and close once it is sent, without waiting for the 221."""
        transport = self.transport
        if transport is None or transport.is_closing():  # the host hung up meanwhile
            return
        if self.engine.state is ClientState.READY:
            self.engine.quit()
        transport.write(self.engine.data_to_send())
        transport.close()

    async def quit(self) -> None:
        """Polite QUIT with a short wait, then close."""
        if self.engine.state is ClientState.CLOSED:
            self.close()
            return
        try:
            self.engine.quit()
            await asyncio.wait_for(self._until_closed(), self._limit(5.0))
        except (TimeoutError, RuntimeError):
            pass
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _until_closed(self) -> None:
        while not isinstance(await self.next_event(), Closed):
            pass


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class RemoteDelivery:
    """Delivers messages to remote domains; one instance is shared by the queue runner."""

    def __init__(
        self,
        cfg: Config,
        resolver: Resolver,
        *,
        tls_context: Callable[[bool], ssl.SSLContext] = client_context,
        reply_timeout: float | None = None,
        cache_idle: float = 10.0,
        max_cached: int = 50,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self.resolver = resolver
        self._tls_context = tls_context
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self._reply_timeout = reply_timeout
        self._cache_idle = cache_idle
        self._max_cached = max_cached
        self._max_addresses = max_addresses
        self._idle: dict[tuple[str, str, int, bool], list[_Session]] = {}
        self._generation = 0  # reconfigure() counts; a session of an older one is not kept
        # Transactions whose final dot is out, waiting for the reply that commits them: a stop
        # waits for these longer, since leaving now sends the message again (RFC 5321 §6.1).
        self.committing = 0
        # Set by a stop: no final dot goes out that the reply to might not be waited for.
        self.stopping = False
        # Addresses that timed out before a session was made (a tarpit, a host gone): when,
        # until when they are not dialled, and why (RFC 5321 §4.5.4.1: a client SHOULD keep
        # a list of hosts it cannot reach). Each message to them waited the whole time-out
        # again, a few at a time: 200 for a tarpit held slots for 100 minutes.
        self._unreachable: dict[str, tuple[float, float, Reply]] = {}

    async def deliver(
        self,
        domain: str,
        message: OutgoingMessage,
        source: MessageSource,
        may_finish: MayFinish | None = None,
        final: dict[int, DeliveryResult] | None = None,
        queue_id: str = "",
        marked_since: float | None = None,
    ) -> list[DeliveryResult]:
        """Try to deliver ``message`` (all recipients in ``domain``); one result per recipient,
        in the order of ``message.recipients``. Never raises for network or DNS trouble.
        ``may_finish``: see the module docstring (without it, every message is finished).
        ``final`` gets each recipient's result (by its index) as soon as a host gave one that
        is not temporary: a caller cancelled while a later host is tried, or given
        :class:`DotWithheld`, reads there what earlier hosts took (RFC 5321 §6.1: their 250
        commits them); given DotWithheld, also what they deferred (their own 4xx).
        ``queue_id`` names the message in the lines logged for each host that failed;
        ``marked_since``: a host that timed out after this time is passed over (a retry gives
        when it was due: what timed out before, in its own last attempt above all, is what
        its wait was for), None: any that timed out lately (a first attempt)."""
        route = await self.resolver.route(domain)
        route = drop_self(
            route,
            domain,
            hostnames=[self.cfg.hostname],
            listeners=self.cfg.listen.smtp,
            port=self.cfg.delivery.port,
        )
        if route.failure is not None:
            outcome = Outcome.PERMANENT if route.failure.permanent else Outcome.TEMPORARY
            reply = route.failure.reply
            return [DeliveryResult(r, outcome, reply) for r in message.recipients]

        verify = domain.lower() in {d.lower() for d in self.cfg.delivery.tls_verify_domains}
        pending = list(range(len(message.recipients)))
        final = {} if final is None else final
        last_temp: dict[int, DeliveryResult] = {}
        lacking: dict[int, list[DeliveryResult]] = {}  # refused for extensions hosts lack
        session_error: _NoSession | None = None
        unreached: _NoSession | None = None  # the last temporary one
        data: bytes | None = None

        def withheld(exc: DotWithheld) -> DotWithheld:
            """``exc``, with what the hosts tried said of the recipients left (a 4xx, a refused
            session: their own words, not our stop's) put in ``final``; for now only, since
            the hosts not tried yet may take them (a 554 greeting bounced the message when
            the server stopped before the next MX host)."""
            for i in pending:
                if i in last_temp:
                    final.setdefault(i, last_temp[i])
                elif session_error is not None:
                    said = _session_result(message.recipients[i], unreached or session_error)
                    final.setdefault(i, replace(said, outcome=Outcome.TEMPORARY))
            return exc

        tried = 0
        for target in route.targets:
            for ip in target.addresses:
                if not pending or tried >= self._max_addresses:
                    break
                if self.stopping:  # (waited for its slot, or a backup host: none is dialled)
                    raise withheld(DotWithheld("", NOT_TRIED))
                suspended = self._suspended(target, ip, marked_since)
                cached = self._idle.get(self._session_key(target, ip, verify))
                if suspended is not None and not cached:  # (not counted: the next is dialled)
                    session_error = unreached = (_SessionFailed(suspended), target.host, ip)
                    continue
                tried += 1
                if data is None:
                    data = source if isinstance(source, bytes) else await source()
                batch = pending
                while batch:
                    sub = replace(message, recipients=tuple(message.recipients[i] for i in batch))
                    try:
                        done, tls = await self._deliver_at(
                            target, ip, sub, data, verify, may_finish
                        )
                    except _SessionFailed as exc:
                        session_error = (exc, target.host, ip)
                        if not exc.permanent:
                            unreached = session_error
                        if exc.timed_out:
                            self._mark_unreachable(ip, exc.reply)
                        events.host_failed(queue_id, target.label, ip, str(exc.reply), len(batch))
                        break
                    except DotWithheld as exc:  # what hosts before this one took (RFC 5321
                        withheld(exc)  # §6.1: their 250 commits them) is kept, and the rest
                        raise
                    except LeaseLost:
                        raise
                    except Exception:  # a bug of ours with this host: the next one is tried,
                        # and what earlier hosts took is kept (else it would go again)
                        log.exception("delivery to %s[%s] failed", target.label, ip)
                        failed = _SessionFailed(
                            _temp("4.3.0", f"{target.label}[{ip}]: local error")
                        )
                        session_error = unreached = (failed, target.host, ip)
                        break
                    too_many: list[int] = []
                    deferred: list[tuple[int, DeliveryResult]] = []  # by this host, for now
                    for i, res in zip(batch, done.results, strict=True):
                        reply = res.reply
                        mta: str | None = target.host
                        if reply.local:
                            reply, mta = _naming(reply, f"{target.label}[{ip}]"), None
                        result = DeliveryResult(
                            message.recipients[i],
                            res.outcome,
                            reply,
                            mta,
                            done.dsn,
                            ip,
                            tls,
                            target.host,
                        )
                        if res.missing is not None:
                            # RFC 6531 §3.2, RFC 6152 §3: this host lacks an extension the
                            # message needs. Its shortcoming, not the domain's: the next host
                            # is tried (RFC 5321 §5.1), and may offer it.
                            lacking.setdefault(i, []).append(result)
                            continue
                        if res.outcome is not Outcome.TEMPORARY:
                            final[i] = result
                            continue
                        last_temp[i] = result  # try the next host for this one too
                        deferred.append((i, result))
                        if res.reply.code in (452, 552):
                            too_many.append(i)
                    # RFC 5321 §4.5.3.1.10: recipients refused as too many in a transaction
                    # that delivered others go in the next one, to this host, at once. (Each
                    # round delivers at least one: the loop ends.)
                    delivered = any(r.outcome is Outcome.DELIVERED for r in done.results)
                    batch = too_many if delivered else []
                    left = [r for i, r in deferred if i not in batch]  # (not sent again here)
                    if left:  # they wait for the next host or attempt
                        said = str(left[0].reply)
                        events.host_failed(queue_id, target.label, ip, said, len(left))
                pending = [i for i in pending if i not in final]
        if unreached is None and route.unreached:
            # An MX host whose addresses could not be looked up for now was never tried: it
            # may take the message later (RFC 5321 §5.1), as a host not reached would.
            host = route.unreached[0][1]
            reply = _temp("4.4.3", f"DNS failure looking up the addresses of MX host {host}")
            unreached = (_SessionFailed(reply), host, None)
        for i in pending:
            rcpt = message.recipients[i]
            if i in last_temp:
                final[i] = last_temp[i]
            elif i in lacking:
                # No host that answered offers what the message needs: a bounce (the last
                # one's refusal, naming the others). A host not reached (no connection, TLS,
                # a 4xx greeting) might: deferred, with its failure, until it answers.
                if unreached is None:
                    final[i] = _lacking_everywhere(lacking[i])
                else:
                    final[i] = _session_result(rcpt, unreached)
            elif unreached is not None:
                # A host could not be reached for now (no connection, a 4xx greeting): it may
                # take the message later (RFC 5321 §5.1: each address MUST be tried and
                # retried), even when a later one refused us for good.
                final[i] = _session_result(rcpt, unreached)
            elif session_error is not None:
                # Every host tried refused us for good (RFC 5321 §3.1: a 554 greeting; a 5xx
                # to EHLO and HELO): a bounce, not retries until expiry.
                final[i] = _session_result(rcpt, session_error)
            else:  # pragma: no cover - a Route always has at least one address
                reply = _temp("4.4.4", f"no address to try for {domain}")
                final[i] = DeliveryResult(rcpt, Outcome.TEMPORARY, reply)
        return [final[i] for i in range(len(message.recipients))]

    def _session_key(self, target: Target, ip: str, verify: bool) -> tuple[str, str, int, bool]:
        """What a cached session is kept under (see :meth:`_take`)."""
        return (target.host, ip, self.cfg.delivery.port, verify)

    def _mark_unreachable(self, ip: str, reply: Reply) -> None:
        """``ip`` timed out: not dialled again for the first retry interval (at most 5 min,
        Postfix's minimal_backoff_time), the time the messages it failed wait anyway. Marks
        run out are dropped here too (one only looked up again would stay for good)."""
        now = self._clock()
        wait = min(float(self.cfg.delivery.retry_intervals[0]), UNREACHABLE_MAX)
        self._unreachable = {a: m for a, m in self._unreachable.items() if m[1] > now}
        self._unreachable[unmapped(ip)] = (now, now + wait, reply)

    def _suspended(self, target: Target, ip: str, since: float | None) -> Reply | None:
        """Why ``ip`` is not dialled now (it timed out lately, after ``since``), or None."""
        mark = self._unreachable.get(unmapped(ip))
        if mark is None:
            return None
        marked, until, reply = mark
        if until <= self._clock():
            return None  # (dropped at the next mark)
        if since is not None and marked <= since:
            return None
        why = reply.text
        return _temp("4.4.1", f"{target.label}[{ip}]: delivery temporarily suspended: {why}")

    def forget_unreachable(self) -> None:
        """Dial every address again (``queue flush``: the admin says the hosts are back)."""
        self._unreachable.clear()

    async def _deliver_at(
        self,
        target: Target,
        ip: str,
        message: OutgoingMessage,
        data: bytes,
        verify: bool,
        may_finish: MayFinish | None = None,
    ) -> tuple[MessageDone, str]:
        """The transaction's result, and the TLS it went over (or PLAINTEXT); LeaseLost if
        ``may_finish`` refused the final dot."""
        key = self._session_key(target, ip, verify)
        session = self._take(key)
        if session is not None:
            try:
                done: MessageDone | None = await self._transact_or_close(
                    session, target, ip, message, data, may_finish
                )
            except _Dropped:
                done = None
            if done is not None and not done.unanswered:
                return await self._keep(key, session, done)
            # The server dropped the cached connection meanwhile (an idle time-out, a limit on
            # messages per session: RFC 5321 §3.8) before this message reached it: a new one.
            session.close()
        policy = TLSPolicy.REQUIRED if verify else TLSPolicy.OPPORTUNISTIC
        try:
            session = await self._open(target, ip, verify, policy)
        except _SessionFailed as exc:
            if not exc.tls_failed or verify:
                raise
            session = await self._open(target, ip, verify, TLSPolicy.NONE)
        done = await self._transact_or_close(session, target, ip, message, data, may_finish)
        return await self._keep(key, session, done)

    async def _transact_or_close(
        self,
        session: _Session,
        target: Target,
        ip: str,
        message: OutgoingMessage,
        data: bytes,
        may_finish: MayFinish | None,
    ) -> MessageDone:
        """:meth:`_transact`; a session it leaves by an exception is closed (QUIT if nothing
        is under way, RFC 5321 §4.1.1.10), not left open to the host's time-out."""
        try:
            return await self._transact(session, target, ip, message, data, may_finish)
        except BaseException:
            if session.engine.state is ClientState.READY:
                session.quit_nowait()
            else:
                session.close()
            raise

    async def _transact(
        self,
        session: _Session,
        target: Target,
        ip: str,
        message: OutgoingMessage,
        data: bytes,
        may_finish: MayFinish | None,
    ) -> MessageDone:
        """One transaction on a ready session; LeaseLost if ``may_finish`` refused its dot."""
        if self.stopping:  # (a session opened before the stop: a small BDAT would commit)
            raise DotWithheld(f"{target.label}[{ip}]", NOT_TRIED, session.tls)
        # RFC 5321 §4.5.3.1.6 (lines) and RFC 6152 §3 (8-bit to a peer without 8BITMIME).
        eight_bit = "8BITMIME" in session.engine.extensions
        if len(data) > OFF_LOOP:  # a pass (or more) over a large message: not on the loop
            fitted = await asyncio.to_thread(mime_downgrade.downgrade, data, eight_bit=eight_bit)
        else:
            fitted = mime_downgrade.downgrade(data, eight_bit=eight_bit)
        # The final dot is held back, to be sent only if the transaction may still commit
        # (the lease is ours, the server is not stopping), where it costs no round trip: with
        # DATA, which waits for its 354 anyway (a stop may come meanwhile), and on a shared
        # queue (fenced). A small message to a CHUNKING host goes whole in the first write.
        if session.engine.state is not ClientState.READY:  # ended meanwhile (a stray reply)
            event = await session.next_event()
            reply = event.reply if isinstance(event, Closed) else _temp("4.4.2", "session ended")
            raise _Dropped(self._session_reply(reply, f"{target.label}[{ip}]"))
        one_write = "CHUNKING" in session.engine.extensions and len(fitted) <= BDAT_MAX
        hold = may_finish is not None or not one_write
        session.engine.send_message(message, fitted, hold_end=hold)
        committing = not hold  # the final dot went with the message
        self.committing += int(committing)
        try:
            event = await session.next_event()
            if isinstance(event, EndOfData):  # the message is written, but for its final dot
                refusal = None
                if self.stopping:
                    refusal = STOPPED
                elif may_finish is not None and not may_finish():
                    refusal = FENCED
                if refusal is not None:
                    session.engine.abort(refusal)
                    session.close()  # the dot never goes out: the host cancels the transaction
                    raise DotWithheld(f"{target.label}[{ip}]", refusal, session.tls)
                session.engine.end_data()
                committing = True
                self.committing += 1
                event = await session.next_event()
        finally:
            self.committing -= int(committing)
        if not isinstance(event, MessageDone):  # pragma: no cover - the engine always reports
            session.close()
            raise _SessionFailed(
                _temp("4.4.2", f"{target.label}[{ip}]: no result"), tls=session.tls
            )
        return event

    async def _keep(
        self, key: tuple[str, str, int, bool], session: _Session, done: MessageDone
    ) -> tuple[MessageDone, str]:
        """Cache the session if it is ready for another message (after the RSET that closes a
        failed transaction); the result, and the TLS it went over (or PLAINTEXT)."""
        tls = session.tls
        try:
            ready = isinstance(await session.next_event(), Ready)
        except BaseException:  # (cancelled waiting for the RSET's reply: not left open)
            session.close()
            raise
        if ready:
            self._put(key, session)
        else:
            session.close()
        return done, tls

    async def _open(self, target: Target, ip: str, verify: bool, policy: TLSPolicy) -> _Session:
        loop = asyncio.get_running_loop()
        port = self.cfg.delivery.port
        where = f"{target.label}[{ip}]:{port}"
        engine = ClientEngine(self.cfg.hostname, tls=policy)
        session = _Session(engine, target.host, ip, self._reply_timeout)
        session.generation = self._generation
        delivery = self.cfg.delivery
        dialled = unmapped(ip)  # an IPv4-mapped IPv6 address is an IPv4 host
        source = delivery.bind_address6 if ":" in dialled else delivery.bind_address
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: session, dialled, port, local_addr=(source, 0) if source else None
                ),
                float(delivery.connect_timeout),
            )
        except TimeoutError:
            reply = _temp("4.4.1", f"connect to {where}: timed out")
            raise _SessionFailed(reply, timed_out=True) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise _SessionFailed(_temp("4.4.1", f"connect to {where}: {reason}")) from None
        try:
            while True:
                event = await session.next_event()
                if isinstance(event, Ready):
                    if engine.state is not ClientState.READY:
                        continue  # ended in the same read (a reply out of turn): Closed follows
                    return session
                if isinstance(event, StartTLS):
                    await self._start_tls(session, target, ip, verify)
                    continue
                if isinstance(event, Closed):
                    # Ended between the 220 to STARTTLS and a working TLS session (bytes
                    # injected before the handshake): a TLS failure, retried in plaintext.
                    in_tls = policy is not TLSPolicy.NONE and engine.tls_begun and not engine.secure
                    refusal = engine.refused_us and event.reply.is_permanent
                    reply = self._session_reply(event.reply, where)
                    # (tls: after STARTTLS, a 421 or 5xx to EHLO, or a close, came over TLS)
                    raise _SessionFailed(
                        reply,
                        tls_failed=in_tls,
                        permanent=refusal,
                        tls=session.tls,
                        timed_out=session.timed_out,
                    )
        except BaseException:
            session.close()
            raise

    @staticmethod
    def _session_reply(reply: Reply, where: str) -> Reply:
        """A greeting/EHLO failure: the server's own 4xx/5xx word for word (a DSN quotes it as
        the host's Diagnostic-Code, RFC 3464 §2.3.6; a 5xx is final when it is the last host
        tried); one of ours, or a reply that is no refusal, names the host and is temporary."""
        if reply.local:
            return _naming(reply, where)
        if reply.is_transient or reply.is_permanent:
            return reply
        return _temp("4.4.1", f"host {where} refused to talk to me: {reply}")

    async def _start_tls(self, session: _Session, target: Target, ip: str, verify: bool) -> None:
        loop = asyncio.get_running_loop()
        ctx = self._contexts.get(verify)
        if ctx is None:
            ctx = self._contexts[verify] = self._tls_context(verify)
        literal = target.host.startswith("[")
        name = ip if literal else target.host
        transport = session.transport
        assert transport is not None
        try:
            new = await loop.start_tls(
                transport,
                session,
                ctx,
                server_hostname=name,
                ssl_handshake_timeout=float(self.cfg.delivery.connect_timeout),
            )
        except (OSError, ssl.SSLError, ssl.CertificateError, TimeoutError, ValueError) as exc:
            events.tls_handshake("delivery", ip, None, str(exc) or type(exc).__name__)
            transport.abort()
            # Our finding, not the server's reply: the DSN must not say the host "said" it.
            reply = _temp("4.7.5", f"TLS with {target.label}[{ip}] failed: {exc}")
            raise _SessionFailed(reply, tls_failed=True, tls=session.tls) from None
        if new is None:  # pragma: no cover - only for server_side
            raise _SessionFailed(_temp("4.7.5", "TLS not established"), tls_failed=True)
        session.transport = new
        session.tls = tls_session(new) or "TLS"  # ("TLS": a transport that does not say)
        events.tls_handshake("delivery", ip, tls_version(new), None)
        session.engine.tls_started()

    # --- the connection cache ------------------------------------------------------------------

    def _take(self, key: tuple[str, str, int, bool]) -> _Session | None:
        """A cached session to ``key`` that is ready for a message. No RSET probe: the reply
        to the last final dot left it clean (RFC 5321 §4.1.1.4), and a connection dropped
        meanwhile is noticed at MAIL (``MessageDone.unanswered``), a round trip saved."""
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            fresh = time.monotonic() - session.last_used < self._cache_idle
            transport = session.transport
            ready = session.engine.state is ClientState.READY
            if fresh and ready and transport is not None and not transport.is_closing():
                return session
            session.close()
        return None

    def _put(self, key: tuple[str, str, int, bool], session: _Session) -> None:
        total = sum(len(v) for v in self._idle.values())
        if total >= self._max_cached or session.generation != self._generation:
            session.quit_nowait()
            return
        session.last_used = time.monotonic()
        self._idle.setdefault(key, []).append(session)

    def reconfigure(self, cfg: Config, resolver: Resolver) -> None:
        """A reload: the next steps read ``cfg``; sessions opened under the old one (another
        bind address, EHLO name, TLS policy) are ended with QUIT (RFC 5321 §4.1.1.10): those
        cached now at once, those busy now when their message is done."""
        self.cfg, self.resolver = cfg, resolver
        self._generation += 1
        idle, self._idle = self._idle, {}
        for sessions in idle.values():
            for session in sessions:
                session.quit_nowait()

    async def close_idle(self, *, all_sessions: bool = False) -> None:
        """QUIT cached sessions idle longer than ``cache_idle`` (or all of them)."""
        now = time.monotonic()
        closing: list[_Session] = []
        for key in list(self._idle):
            keep = []
            for session in self._idle[key]:
                if all_sessions or now - session.last_used >= self._cache_idle:
                    closing.append(session)
                else:
                    keep.append(session)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if closing:
            await asyncio.gather(*(s.quit() for s in closing), return_exceptions=True)

    async def aclose(self) -> None:
        """QUIT every cached session (at shutdown), waiting at most a second for the 221s: a
        host slow to answer QUIT held the exit up to 5 s more, past the 10 s a stop may take."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.close_idle(all_sessions=True), SHUTDOWN_QUIT_WAIT)

    @property
    def cached(self) -> int:
        return sum(len(v) for v in self._idle.values())


def needs_relayed_dsn(result: DeliveryResult) -> bool:
    """RFC 3461 §4.1: a delivered recipient asked for NOTIFY=SUCCESS but the next hop has no DSN
    extension, so we owe the sender a "relayed" notification."""
    notify = {n.upper() for n in result.recipient.notify or ()}
    return result.outcome is Outcome.DELIVERED and "SUCCESS" in notify and not result.dsn_offered
