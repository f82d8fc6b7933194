"""The queue runner: takes finished messages, delivers them, retries, bounces what never works.

Every message comes in through :meth:`QueueRunner.accept` (the SMTP policy's one hand-off; the
DSNs this runner makes take its storing half, :meth:`_store`): the runner decides that local
recipients get their copies at once, in the same commit that makes the message durable, and
that the other recipients' first attempt starts now (recorded in that same commit, so a crash
cannot turn it into a hot retry loop).
Each attempt splits the recipients: local ones go to the mailboxes, remote ones to
``delivery/remote.py``, one transaction per destination domain. Before a remote host is dialled
again the attempt count and next retry are stored (:meth:`MessageQueue.begin_attempt`). A
recipient ends ``delivered`` or ``bounced`` (with a DSN to the sender, RFC 3464, never to
``<>``), or stays ``deferred`` until its next attempt or ``max_queue_time``. A DSN is stored as
owed with the outcome it reports before it is queued, and started only once that outcome is
recorded, so that no crash sends it twice (:meth:`_make_reports`; docs/durability.md).

Each outcome has one home, for its log line and metric (:mod:`postroom.events`):
:meth:`_accepted`, :meth:`_outcome` (delivered, deferred, bounced), :meth:`_expired`.
The resolver, the clock and the jitter are injected (tests run attempts without sleeping or
DNS). On a shared queue (several nodes) ``lease_fresh`` fences remote deliveries: asked before
the final dot of each message, it says whether this worker's lease on the message was
confirmed recently enough that no other node can have taken it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from postroom import events
from postroom.address import domain_of, local_key
from postroom.delivery import mime_downgrade
from postroom.delivery.dsn import (
    Action,
    DsnRecipient,
    build_dsn,
    failure_status,
    format_date,
    xtext_encode,
)
from postroom.delivery.remote import (
    NOT_TRIED,
    PLAINTEXT,
    DeliveryResult,
    DotWithheld,
    RemoteDelivery,
    needs_relayed_dsn,
)
from postroom.errors import LeaseLost, QueueError, StorageUnavailable, TemporaryStorageError
from postroom.queue import schedule
from postroom.queue.envelope import (
    Attempt,
    Envelope,
    PendingReport,
    Recipient,
    Status,
    new_queue_id,
)
from postroom.queue.slots import ProcessSlots
from postroom.resolver import DnsResolver, Resolver, host_label
from postroom.smtp.client_engine import ForwardPath, Outcome, OutgoingMessage
from postroom.storage.interfaces import (
    DestinationSlots,
    LocalCopy,
    MailboxDelivery,
    MessageDraft,
    MessageQueue,
)
from postroom.wire import replies
from postroom.wire.framing import to_crlf
from postroom.wire.replies import Reply

if TYPE_CHECKING:
    from postroom.config import Config
    from postroom.services import Services


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message is durable: the client may get its 250."""

    queue_id: str


LOCAL_HOST = "local"  # the ``host`` of a Maildir delivery in the attempt history
LOCAL_DELIVERED = "250 2.0.0 delivered to its mailbox"
BACKLOG = 4  # first attempts waiting for a slot beyond this many times max_concurrent are parked
REPORT_WAIT = 30.0  # seconds a DSN waits, after a crash, for its message to record it
# Logged for a recipient whose attempt the stop cut off (its final dot may have been out):
CUT_SHORT = "451 4.3.2 attempt cut short by the stop: tried again at the next start"
# Seconds an attempt waits, after a domain's recipients failed and before their bounce, for
# the other domains of the message to be decided too (one bounce for those that fail at once).
BOUNCE_TOGETHER = 2.0
CUT_SAVE_WAIT = 0.5  # seconds a stop waits for the attempts it cancelled to store their outcomes


@dataclass(slots=True)
class _First:
    """A message just accepted: its local copies' attempts, and the recipients they reached
    (``decided``: the notices these owe are decided, by the attempt's end)."""

    attempts: list[Attempt]
    done: list[Recipient]
    decided: bool = False


class _Dialling:
    """What the domains of one attempt share as each takes its slots: the attempt's count,
    stored once before its first host is dialled (not while it waits for a slot: one the stop
    then cuts dialled nothing), and the message as SMTP sends it, read when a host is about
    to take it and let go when none is at it, so that attempts waiting for a slot hold no
    message in memory."""

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes]],
        begin: Callable[[], Awaitable[None]],
        counted: bool,
        due: float | None = None,
    ) -> None:
        self.counted = counted
        self.due = due  # when a retry became due (None: a first attempt); see deliver()
        self.dialled = False  # a host of the attempt was about to be dialled
        self._read, self._begin = read, begin
        self._data: bytes | None = None
        self._users = 0
        self._lock = asyncio.Lock()  # (two domains at once: counted once, read once)

    async def take(self) -> bytes:
        """Count the attempt if it is not yet, and the message; :meth:`give_back` after."""
        self._users += 1
        self.dialled = True
        try:
            async with self._lock:
                if not self.counted:
                    self.counted = True  # (counted in memory before the store: see _settle)
                    await self._begin()
                if self._data is None:
                    self._data = _wire(await self._read())
        except BaseException:
            self.give_back()
            raise
        return self._data

    def give_back(self) -> None:
        self._users -= 1
        if not self._users:
            self._data = None

    @property
    def held(self) -> bytes:
        """The message if it is in memory now, else empty (a DSN reads it again)."""
        return self._data or b""


class QueueRunner:
    """Takes messages and runs their attempts; one per worker. Only the queue's owner (the
    primary worker) runs the schedule of retries; every worker makes the first attempt of
    the messages it accepted."""

    def __init__(
        self,
        services: Services,
        queue: MessageQueue,
        mailboxes: MailboxDelivery,
        resolver: Callable[[Config], Resolver] | None = None,
        slots: DestinationSlots | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] | None = None,
        lease_fresh: Callable[[str], bool] | None = None,
    ) -> None:
        self.services = services
        self.queue = queue
        self.mailboxes = mailboxes
        self._resolver = resolver or (lambda cfg: DnsResolver(cfg.dns))
        self._clock = clock
        rng = random.Random()
        self._jitter = jitter or (lambda: rng.uniform(0, 0.1))
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._again: dict[str, Envelope] = {}  # claimed while still in flight: started after
        self._deleted: set[str] = set()  # deleted by the admin during their attempt
        self._slots = asyncio.Semaphore(services.cfg.delivery.max_concurrent)
        self._stopping = False  # start nothing
        self._draining = False  # the stop has begun: claim nothing, dial nothing
        self._remote: RemoteDelivery | None = None
        self._destinations = slots or ProcessSlots()
        self._lease_fresh = lease_fresh  # None: one node, nobody else can take a message

    @property
    def cfg(self) -> Config:
        """The configuration now: SIGHUP replaces it (a domain added is local from then on)."""
        return self.services.cfg

    def is_local(self, address: str) -> bool:
        return self.cfg.is_local_domain(domain_of(address))

    # -- the one way in --------------------------------------------------------------------

    async def accept(self, envelope: Envelope, draft: MessageDraft) -> Accepted | Reply:
        """Make a finished message durable and start its delivery: ``Accepted`` once it is
        durable (then, and only then, the client gets its 250), or the reply to send."""
        # (A notice owed from the start, an alias's "expanded", is sent by the first attempt.
        # None is ever sent to the null sender: its SUCCESS holds nothing.)
        hold = bool(envelope.reports) or (
            bool(envelope.sender)
            and any(r.notify and "SUCCESS" in r.notify for r in envelope.recipients)
        )
        try:
            first = await self._store(envelope, draft, hold)
        except TemporaryStorageError as exc:
            self.services.log.error("queue write failed for %s: %s", envelope.id, exc)
            return (
                replies.STORAGE_AWAY
                if isinstance(exc, StorageUnavailable)
                else replies.STORAGE_FULL
            )
        if not envelope.done or hold:
            self._start(envelope, first)
        return Accepted(envelope.id)

    async def _store(self, envelope: Envelope, draft: MessageDraft, hold: bool) -> _First:
        """Make the message durable with its local copies (``hold``: keep it queued even if
        they are all it has); their results. The first attempt of the others is counted."""
        now = self._clock()
        # An account deleted since its RCPT (user del during DATA) gets no copy: its
        # recipient stays queued, and the first attempt bounces it as it would a queued one.
        local = [
            LocalCopy(i, r.address)
            for i, r in enumerate(envelope.recipients)
            if not r.done
            and self.is_local(r.address)
            and self.services.accounts.has_mailbox(r.address)
        ]
        if len(local) < len(envelope.recipients):  # the others' first attempt starts now
            if self._draining:  # none dials now: nothing counted, due at once at the next start
                envelope.next_attempt = now
            else:
                self._count_attempt(envelope, now, self._jitter())
        started = time.monotonic()
        errors = await self.queue.accept(envelope, draft, local, hold)
        self._accepted(envelope)
        attempts = self._local_results(envelope, local, errors, now, time.monotonic() - started)
        return _First(attempts, [r for _i, r in _of(envelope, local) if r.status == "delivered"])

    async def accept_made_here(
        self, sender: str, recipients: list[str], message: bytes, queue_id: str = ""
    ) -> str:
        """Queue a message made on this host (a DSN, a DMARC report: CRLF, our own Received
        line in it) through the same way in; its queue id. TemporaryStorageError if the
        queue refused it."""
        envelope = self._made_here(sender, recipients, queue_id or new_queue_id())
        draft = self.queue.draft(envelope.id, sender)
        draft.write(message)
        result = await self.accept(envelope, draft)
        if not isinstance(result, Accepted):
            raise TemporaryStorageError(f"cannot queue a message for {', '.join(recipients)}")
        return envelope.id

    def _made_here(
        self, sender: str, recipients: list[str], queue_id: str, parent: str = ""
    ) -> Envelope:
        return Envelope(
            id=queue_id,
            sender=sender,
            recipients=[Recipient(address) for address in recipients],
            created=self._clock(),
            is_bounce=not sender,
            smtputf8=not all(r.isascii() for r in recipients),
            parent=parent,
        )

    def _count_attempt(self, envelope: Envelope, now: float, jitter: float = 0.0) -> None:
        envelope.attempts += 1
        envelope.last_attempt = now
        envelope.next_attempt = self._retry_time(envelope, now, jitter)

    def _retry_time(self, envelope: Envelope, after: float, jitter: float) -> float:
        """When the next attempt is due, its attempts so far ending at ``after``."""
        return schedule.next_attempt(
            after,
            envelope.attempts,
            self.cfg.delivery.retry_intervals,
            jitter=jitter,
            deadline=envelope.created + self.cfg.delivery.max_queue_time,
        )

    def _wait_from_the_end(self, envelope: Envelope) -> None:
        """RFC 5321 §4.5.4.1: the retry waits "after one attempt has failed". The count and
        the next time are stored before dialling (a crash then retries no sooner), from the
        attempt's start; an attempt longer than the wait (a tarpit's 5 minutes) was due again
        the moment it failed. The wait now runs from its end."""
        later = self._retry_time(envelope, self._clock(), self._jitter())
        envelope.next_attempt = max(envelope.next_attempt, later)

    # -- the schedule (the owner) ----------------------------------------------------------

    async def run(self) -> None:
        """Start due attempts until stopped. An error in claiming them (one the queue did not
        expect: its disk failing, say) is logged and the schedule goes on: it ended the
        task, and no message was tried again, in silence, until the next restart."""
        while not self._draining:
            try:
                for envelope in await self.queue.claim(self._clock(), 100):
                    self._start(envelope)
            except Exception:
                self.services.log.exception("queue runner: cannot take the due messages")
            for problem in self.queue.problems():
                self.services.log.error("%s", problem)
            await self.queue.wait(5.0)

    async def close_idle_sessions(self, interval: float = 2.0) -> None:
        """QUIT the cached SMTP sessions left idle too long, until stopped: in every worker,
        since each delivers the first attempt of what it accepts (only the owner did it, and
        the others' sessions stayed open until the remote host hung up)."""
        while not self._draining:
            await asyncio.sleep(interval)
            if self._remote is not None:
                await self._remote.close_idle()

    def forget_unreachable(self) -> None:
        """``queue flush``: remote hosts that timed out are dialled again at once."""
        if self._remote is not None:
            self._remote.forget_unreachable()

    async def delete(self, queue_id: str) -> bool:
        """``queue delete``: remove the message now. An attempt in progress goes on with the
        copy it holds, but nothing is retried, reported or saved for it afterwards."""
        try:
            await self.queue.delete(queue_id)
        except QueueError:
            return False
        self.deleted_elsewhere(queue_id)
        return True

    @property
    def busy(self) -> AbstractSet[str]:
        """The messages whose attempts run now."""
        return self._inflight.keys()

    def deleted_elsewhere(self, queue_id: str) -> None:
        """The message was deleted (here, or from another node): an attempt of it running
        here goes on with the copy it holds, but records, retries and reports nothing."""
        if queue_id in self._inflight:
            self._deleted.add(queue_id)

    def begin_stop(self) -> None:
        """The server's stop has begun: claim nothing more from the queue, dial no host, and
        send no final dot, from now on (RFC 5321 §6.1: a dot sent now may get its 250 after
        the exit, and the restart sends the message again). Attempts in flight go on until
        :meth:`stop` waits for them; one that reaches its final dot ends there (DotWithheld).
        The first attempt of mail accepted meanwhile still runs: its local copies and its
        notices are made, its remote recipients wait for the next start, due at once."""
        self._draining = True
        if self._remote is not None:
            self._remote.stopping = True

    async def stop(self, timeout: float = 5.0, commit_timeout: float = 0.0) -> None:
        """Start nothing more; wait up to ``timeout`` for the attempts in flight, then cancel
        them (a cancelled one stays queued and is tried again after the restart; what it
        learnt, a 250 already received, a DSN owed, is stored first). While a
        remote host holds the reply to a final dot already sent, wait up to ``commit_timeout``
        in all: leaving sooner makes it receive the message twice."""
        self._stopping = True
        self.begin_stop()
        tasks = list(self._inflight.values())
        if tasks:
            started = time.monotonic()
            _done, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            # Then only while a final dot is out (not for the others: they are cut anyway).
            while pending and self._remote is not None and self._remote.committing:
                left = commit_timeout - (time.monotonic() - started)
                if left <= 0:
                    break
                _done, pending = await asyncio.wait(pending, timeout=min(left, 0.05))
            # The operator reads why these messages are still queued (one deleted meanwhile
            # is not: it goes as its attempt ends).
            ids = sorted(
                q
                for q, task in self._inflight.items()
                if task in pending and q not in self._deleted
            )
            if ids:
                self.services.log.info(
                    "stopping: %d delivery attempt(s) cut short, tried again at the next start: %s",
                    len(ids),
                    " ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""),
                )
            for task in pending:
                task.cancel()
            if pending:  # each stores what it learnt as it ends (_keep_cut): a moment
                await asyncio.wait(pending, timeout=CUT_SAVE_WAIT)
        if self._remote is not None:
            await self._remote.aclose()

    def _start(self, envelope: Envelope, first: _First | None = None) -> None:
        if self._stopping or (self._draining and first is None):
            return  # (a first attempt still runs while the stop drains: see begin_stop)
        if envelope.id in self._inflight:  # claimed again before its last attempt ended
            self._again[envelope.id] = envelope
            return
        overload = first is not None and (
            len(self._inflight) >= BACKLOG * self.cfg.delivery.max_concurrent
        )
        task = asyncio.get_running_loop().create_task(self._attempt(envelope, first, overload))
        self._inflight[envelope.id] = task
        if first is not None:  # in the queue, not yet where the queue's gauge looks
            events.first_attempts(1)
        task.add_done_callback(lambda _t: self._ended(envelope.id, first is not None))

    def _ended(self, queue_id: str, first: bool = False) -> None:
        if first:
            events.first_attempts(-1)
        self._inflight.pop(queue_id, None)
        again = self._again.pop(queue_id, None)
        if again is not None:
            self._start(again)

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(
        self, envelope: Envelope, first: _First | None, overload: bool = False
    ) -> None:
        """One attempt: whatever happens, it ends recorded (or dropped). It holds no slot:
        each of its domains takes one (:meth:`_deliver_remote`), so an attempt that waits for
        a destination holds up nothing else."""
        if first is not None and overload:
            # More first attempts waiting than are worth holding in memory and in the journal:
            # this one waits in the queue instead, due at once (nothing was dialled for it).
            await self._park_first(envelope, first, 0.0)
            return
        # Counted already: at acceptance (a first attempt), or as its first host is about to be
        # dialled (_Dialling).
        counted = -1 if first is not None and envelope.attempts > 0 else envelope.attempts
        try:
            await self._deliver(envelope, first)
        except LeaseLost as exc:
            # Deleted, or another node holds it now: that node records what happens; or
            # cut short by a stop before its final dot: tried again after the restart.
            self.services.log.info("%s: attempt dropped: %s", envelope.id, exc)
        except Exception as exc:
            self._failed(f"delivery of {envelope.id} failed", exc)
            # Try again later rather than lose it or spin; past max_queue_time, give up
            # as after any other attempt (else an error at every try kept it for ever).
            if envelope.id not in self._deleted:
                now = self._clock()
                if envelope.attempts == counted:  # once per attempt, not twice
                    self._count_attempt(envelope, now)
                self._ours_failed(envelope, exc)
                # (a first attempt's local copies owe their notices still, unless decided)
                done = list(first.done) if first is not None and not first.decided else []
                try:
                    await self._settle(envelope, now, [], [], done, set(), b"", counted=True)
                except Exception as again:
                    self._failed(f"cannot record {envelope.id}", again)
        self._deleted.discard(envelope.id)

    async def _begin_attempt(self, envelope: Envelope, now: float) -> None:
        """Count the attempt; stored before dialling, so that a crash now cannot cause an
        immediate retry loop."""
        self._count_attempt(envelope, now, self._jitter())
        await self.queue.begin_attempt(envelope)

    def _ours_failed(self, envelope: Envelope, exc: Exception) -> None:
        """An attempt ended by an error of ours before its hosts had their say: each recipient
        left (a first attempt's local copies are delivered already) is deferred with it,
        logged and kept as its last error (queue list/show say why the mail waits), as an
        error within one domain's delivery is (_deliver_safely)."""
        reply = f"451 4.3.0 local error in delivery: {type(exc).__name__}"
        for rcpt in envelope.recipients:
            if not rcpt.done:
                rcpt.status, rcpt.last_error = "deferred", reply
                transport = "local" if self.is_local(rcpt.address) else "remote"
                events.delivery(envelope, rcpt, transport, reply, "none", 0.0)

    async def _park_first(self, envelope: Envelope, first: _First, due: float) -> None:
        """A first attempt that does not run (an overload, or a stop while it waited): the
        notices its local copies owe are decided now, as only a first attempt knows them
        (sent at the next attempt's start), and the message waits in the queue, due at
        ``due`` at the latest."""
        envelope.reports += self._decide_reports(envelope, [], list(first.done), set())
        envelope.attempts = 0  # (counted at acceptance, but no host was dialled)
        envelope.next_attempt = min(envelope.next_attempt, due)
        await self.queue.record(envelope, first.attempts)

    def _failed(self, what: str, exc: Exception) -> None:
        """Log an attempt's error: one line for storage that refused a write (a full disk: an
        expected, handled case, and the log must stay readable then) or a file it could not
        use (a message file without permission, at every retry), a traceback for a bug."""
        if isinstance(exc, TemporaryStorageError) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
        ):
            self.services.log.warning("%s: %s; tried again later", what, exc)
        elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            self.services.log.error("%s: %s; tried again later", what, exc)
        else:
            self.services.log.exception(what)

    async def _deliver(self, envelope: Envelope, first: _First | None) -> None:
        """One attempt. ``first``: the message was just accepted, its local copies made (these
        are their results) and the attempt of the others recorded with it."""
        now = self._clock()
        if first is None and envelope.parent and await self._owed_by_parent(envelope):
            # A crash came between queuing this DSN and storing that it was: the message it
            # reports on has not settled it yet (it may still make it again). Wait for that.
            self._count_attempt(envelope, now)
            envelope.next_attempt = now + REPORT_WAIT
            await self.queue.record(envelope, [])
            return
        if envelope.reports:
            # Notices owed from acceptance (an alias's "expanded") or stored as owed by an
            # attempt a stop cut short: sent now, not when this attempt ends (dead MX hosts
            # take minutes; a host that holds every attempt until the next stop kept them).
            await self._send_owed(envelope)
        attempts = list(first.attempts) if first is not None else []
        newly_done = list(first.done) if first is not None else []
        newly_failed: list[Recipient] = []
        relayed: set[int] = set()  # (ids of) those handed to a host that will not report success
        local: list[LocalCopy] = []
        remote: dict[str, list[tuple[int, Recipient]]] = defaultdict(list)
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.done or (first is not None and rcpt.status == "deferred"):
                continue  # (a copy that just failed waits for the next attempt)
            if self.is_local(rcpt.address):
                local.append(LocalCopy(index, rcpt.address))
            else:
                remote[domain_of(rcpt.address)].append((index, rcpt))

        for copy in list(local):
            # The account may have gone since RCPT (user del): no Maildir for it, a bounce.
            if not self.services.accounts.has_mailbox(copy.mailbox):
                local.remove(copy)
                rcpt = envelope.recipients[copy.index]
                self._outcome(envelope, rcpt, "bounced", str(replies.USER_UNKNOWN_NOW), LOCAL_HOST)
                newly_failed.append(rcpt)
        if local:
            started = time.monotonic()
            errors = await self.mailboxes.deliver(envelope, local)
            took = time.monotonic() - started
            attempts += self._local_results(envelope, local, errors, now, took)
            newly_done += [r for _i, r in _of(envelope, local) if r.status == "delivered"]

        counted = first is not None and envelope.attempts > 0  # at acceptance
        dialling = _Dialling(
            lambda: self.queue.body(envelope),
            lambda: self._begin_attempt(envelope, now),
            counted,
            envelope.next_attempt if envelope.history else None,
        )
        # Domains whose final dot a stop or the fence held back: the reply, relay, tls to log.
        withheld: dict[str, tuple[str, str, str | None]] = {}
        # The stop has begun: no host is dialled (its final dot would be held back). They wait
        # for the next start, due at once (see _settle).
        drained = bool(remote) and self._draining
        if drained:
            remote = {}
        if remote:
            results = (newly_done, newly_failed, relayed)
            await self._deliver_domains(
                envelope, first, now, remote, dialling, results, attempts, withheld
            )
            if not envelope.done:  # (a delivered message has no next attempt to move)
                self._wait_from_the_end(envelope)

        if envelope.id in self._deleted:
            await self.queue.finish(envelope, attempts)  # released; no bounce, no retry
            return
        if first is not None:
            first.decided = True  # (by _settle, first of all)
        await self._settle(
            envelope, now, attempts, newly_failed, newly_done, relayed, dialling.held,
            dialling.counted, cut=drained or bool(withheld),
        )  # fmt: skip

    async def _deliver_domains(
        self,
        envelope: Envelope,
        first: _First | None,
        now: float,
        remote: dict[str, list[tuple[int, Recipient]]],
        dialling: _Dialling,
        results: tuple[list[Recipient], list[Recipient], set[int]],
        attempts: list[Attempt],
        withheld: dict[str, tuple[str, str, str | None]],
    ) -> None:
        """The remote part of an attempt: each domain at once, its results applied as they
        come (``results``: the recipients newly done, newly failed, relayed), its attempts
        added to ``attempts``, the domains whose dot was held back to ``withheld``. A stop
        that cancels it stores what it holds first (:meth:`_keep_cut`)."""
        newly_done, newly_failed, _relayed = results
        # What each domain's hosts decided so far, read if a stop cancels this attempt.
        kept: dict[str, dict[int, DeliveryResult]] = {d: {} for d in remote}
        tasks = {
            asyncio.ensure_future(
                self._deliver_domain(envelope, d, rcpts, dialling, kept[d], withheld)
            ): d
            for d, rcpts in remote.items()
        }
        applied: set[str] = set()  # domains whose results are applied
        saving: asyncio.Future[None] | None = None
        try:
            if _owes(newly_failed, newly_done):
                # What the local copies owe (a success notice, a bounce for an account gone)
                # goes before any host is waited for, as a domain's does when it is done.
                saving = asyncio.ensure_future(
                    self._save_early(envelope, first, results, dialling.held)
                )
                await asyncio.shield(saving)
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if pending and _outcomes(done) == {Outcome.PERMANENT}:
                    more, pending = await _failing_with(pending)
                    done |= more
                delivered = False
                for task in done:
                    domain = tasks[task]
                    took, domain_results = task.result()
                    delivered |= self._apply_remote(envelope, domain_results, took, *results)
                    applied.add(domain)
                    if domain in withheld:
                        reply, relay, tls = withheld[domain]
                        decided = {id(rcpt) for rcpt, _result in domain_results}
                        for _i, rcpt in remote[domain]:
                            if id(rcpt) not in decided:
                                self._cut_short(envelope, rcpt, reply, relay, tls)
                if pending and (delivered or newly_failed):
                    # Stored now, not when the slowest other domain is done (a dead MX:
                    # minutes): a stop or crash meanwhile must not send these again (only
                    # the instant between the 250 and this write remains, §6.1), and the
                    # DSNs they owe go out now (a bounce is immediate for a remote 5xx).
                    saving = asyncio.ensure_future(
                        self._save_early(envelope, first, results, dialling.held)
                    )
                    await asyncio.shield(saving)
        except asyncio.CancelledError:
            for task in tasks:  # nothing more is learnt than what is kept now
                task.cancel()
            if saving is not None and not saving.done():
                await asyncio.wait([saving])  # (two saves at once would collide)
            cut = {d: rcpts for d, rcpts in remote.items() if d not in applied}
            if first is not None:
                first.decided = True  # (by _keep_cut)
                if not dialling.dialled:  # counted at acceptance, but it waited for slots
                    envelope.attempts = 0
            for task, domain in tasks.items():  # (the history of the domains done)
                if domain in applied:
                    attempts += _attempts(now, task.result()[1])
            await self._keep_cut(envelope, now, cut, kept, *results, attempts)
            raise
        finally:
            for task in tasks:
                task.cancel()
        for task in tasks:  # the attempts in the order of the domains
            attempts += _attempts(now, task.result()[1])

    def _apply_remote(
        self,
        envelope: Envelope,
        domain_results: list[tuple[Recipient, DeliveryResult]],
        took: float,
        newly_done: list[Recipient],
        newly_failed: list[Recipient],
        relayed: set[int],
    ) -> bool:
        """Apply a domain's results to its recipients; whether any was delivered."""
        port = self.cfg.delivery.port
        delivered = False
        for rcpt, result in domain_results:
            reply = str(result.reply)
            host = result.host or result.remote_mta
            label = host_label(host, result.ip or "") if host else ""
            relay = f"{label}[{result.ip}]:{port}" if host and result.ip else "none"
            if result.outcome is Outcome.DELIVERED:
                self._outcome(envelope, rcpt, "delivered", reply, relay, took, tls=result.tls)
                newly_done.append(rcpt)
                if needs_relayed_dsn(result):
                    relayed.add(id(rcpt))
                delivered = True
            elif result.outcome is Outcome.PERMANENT:
                self._outcome(envelope, rcpt, "bounced", reply, relay, took, tls=result.tls)
                newly_failed.append(rcpt)
            else:
                self._outcome(envelope, rcpt, "deferred", reply, relay, took, tls=result.tls)
        return delivered

    def _cut_short(
        self, envelope: Envelope, rcpt: Recipient, reply: str, relay: str, tls: str | None = None
    ) -> None:
        """``rcpt``'s attempt ended with no outcome (a stop, the fence): deferred, logged, its
        last error the one it had (these are our words, not a host's); ``tls``: the session's
        at ``relay``, if one was made."""
        if not rcpt.done:
            rcpt.status = "deferred"
            events.delivery(envelope, rcpt, "remote", reply, relay, 0.0, tls=tls)

    async def _keep_cut(
        self,
        envelope: Envelope,
        now: float,
        cut: dict[str, list[tuple[int, Recipient]]],
        kept: dict[str, dict[int, DeliveryResult]],
        newly_done: list[Recipient],
        newly_failed: list[Recipient],
        relayed: set[int],
        attempts: list[Attempt],
    ) -> None:
        """A stop cancelled the attempt: store what it learnt (in its history too: the
        ``attempts`` so far, and those of the domains ``cut``) with the DSNs that owes, due at
        once (the restart queues them, as after a crash in :meth:`_settle`). Also the results
        of the domains ``cut``, not done: an earlier MX host's 250 while a later host is
        tried (the others of those are logged as cut short). Else the
        restart sends those recipients the message again (RFC 5321 §6.1)."""
        learnt: list[tuple[Recipient, DeliveryResult]] = []
        for domain, rcpts in cut.items():
            for i, (_index, rcpt) in enumerate(rcpts):
                result = kept[domain].get(i)
                if result is not None:
                    rcpt.remote_mta = result.remote_mta
                    self._apply_remote(
                        envelope, [(rcpt, result)], 0.0, newly_done, newly_failed, relayed
                    )
                    learnt.append((rcpt, result))
                elif envelope.id not in self._deleted:  # (deleted: not tried again, not said)
                    self._cut_short(envelope, rcpt, CUT_SHORT, "none")
        if envelope.id in self._deleted:
            return
        envelope.reports += self._decide_reports(envelope, newly_failed, newly_done, relayed)
        envelope.next_attempt = min(envelope.next_attempt, now)
        envelope.history.extend(attempts + _attempts(now, learnt))
        try:
            await self.queue.save(envelope)
        except Exception:  # a full disk, a lease lost: left as before the attempt
            self.services.log.warning(
                "%s: outcomes not stored before the stop", envelope.id, exc_info=True
            )

    async def _settle(
        self,
        envelope: Envelope,
        now: float,
        attempts: list[Attempt],
        newly_failed: list[Recipient],
        newly_done: list[Recipient],
        relayed: AbstractSet[int],
        wire: bytes,
        counted: bool,
        cut: bool = False,
    ) -> None:
        """End an attempt: expire what is past ``max_queue_time``, owe and queue the DSNs,
        and store the outcome (or release the message once every recipient is settled).
        ``cut``: a stop or the fence held a final dot back (or kept the hosts from being
        dialled): that is no outcome, so nothing expires by it; after a stop the message is
        due at once (the host was about to take it; the next start, or node, tries it)."""
        # Deferred recipients past max_queue_time bounce with their last error.
        if not cut and schedule.expired(
            envelope.created, self._clock(), self.cfg.delivery.max_queue_time
        ):
            newly_failed += self._expired(envelope)

        decided = self._decide_reports(envelope, newly_failed, newly_done, relayed)
        if decided:
            # Stored with the outcomes they report before any is queued: a crash from here on
            # makes each at most once (see _make_reports). Due at once after such a crash.
            envelope.reports += decided
            due, envelope.next_attempt = envelope.next_attempt, min(envelope.next_attempt, now)
            await self.queue.save(envelope)
            envelope.next_attempt = due
        made = await self._make_reports(envelope, wire) if envelope.reports else []

        try:
            if envelope.done and not envelope.reports:
                await self.queue.finish(envelope, attempts)
            else:
                if not counted and not (cut and self._draining):  # (nothing was dialled)
                    self._count_attempt(envelope, now)  # only local failures: count it here
                if cut and self._draining:  # (the fence's refusal keeps the schedule)
                    envelope.next_attempt = min(envelope.next_attempt, now)
                await self.queue.record(envelope, attempts)
        except Exception:
            # The record that says the reports were queued failed (a full disk): they are not
            # started, but recorded as they are, due, so that the queue tries them (each first
            # asking whether this message still owes it) rather than only after a restart.
            for report, first_of_report in made:
                with contextlib.suppress(Exception):
                    await self.queue.record(report, first_of_report.attempts)
            raise
        for report, first_of_report in made:  # only now that the record says they were queued
            self._start(report, first_of_report)

    async def _send_owed(self, envelope: Envelope, wire: bytes = b"") -> None:
        """Queue and start the DSNs ``envelope`` owes, recording first that they were queued
        (as :meth:`_settle` does; one that cannot be queued now stays owed). ``wire``: the
        message, if read already."""
        owed = len(envelope.reports)
        made = await self._make_reports(envelope, wire)
        if len(envelope.reports) == owed:
            return
        try:
            await self.queue.save(envelope)
        except Exception:
            for report, first_of_report in made:  # due, each asking if it is still owed
                with contextlib.suppress(Exception):
                    await self.queue.record(report, first_of_report.attempts)
            raise
        for report, first_of_report in made:
            self._start(report, first_of_report)

    async def _save_early(
        self,
        envelope: Envelope,
        first: _First | None,
        results: tuple[list[Recipient], list[Recipient], set[int]],
        wire: bytes,
    ) -> None:
        """Store the outcomes so far in the middle of an attempt, with the DSNs they owe (step
        1 of :meth:`_settle`'s three), then queue and start those (:meth:`_send_owed`); the
        outcomes so reported leave ``results`` (newly done, newly failed), so the attempt's
        end does not report them again. A write that fails (a full disk) leaves them to the
        attempt's end, as before; a lost lease ends the attempt."""
        newly_done, newly_failed, relayed = results
        decided = self._decide_reports(envelope, newly_failed, newly_done, relayed)
        envelope.reports += decided
        # Stored due at once while it owes them (as _settle does): a crash before they are
        # queued has the restart send them now, not at the next retry, hours on.
        due = envelope.next_attempt
        if decided:
            envelope.next_attempt = min(due, self._clock())
        try:
            await self.queue.save(envelope)
        except LeaseLost:
            raise
        except Exception:
            envelope.next_attempt = due
            del envelope.reports[len(envelope.reports) - len(decided) :]
            self.services.log.warning(
                "%s: outcomes not stored before the attempt ends", envelope.id, exc_info=True
            )
            return
        envelope.next_attempt = due
        newly_done.clear()
        newly_failed.clear()
        if first is not None:
            first.decided = True  # (its local copies' notices too: they were in newly_done)
        if envelope.reports:
            try:
                await self._send_owed(envelope, wire)
            except LeaseLost:
                raise
            except Exception as exc:  # stored as owed: the attempt's end or the next sends them
                self._failed(f"{envelope.id}: a delivery status notification not queued", exc)

    def _local_results(
        self,
        envelope: Envelope,
        copies: list[LocalCopy],
        errors: list[OSError | None],
        now: float,
        took: float,
    ) -> list[Attempt]:
        """Apply the outcome of local copies (made in ``took`` seconds); their attempts (one
        per distinct outcome)."""
        by_reply: dict[str, list[str]] = defaultdict(list)
        for copy, error in zip(copies, errors, strict=True):
            rcpt = envelope.recipients[copy.index]
            if error is None:
                self._outcome(
                    envelope, rcpt, "delivered", LOCAL_DELIVERED, LOCAL_HOST, took, copy.mailbox
                )
                by_reply[LOCAL_DELIVERED].append(rcpt.address)
            else:
                text = f"451 4.3.0 local delivery failed: {error.strerror or error}"
                self._outcome(envelope, rcpt, "deferred", text, LOCAL_HOST, took, copy.mailbox)
                by_reply[text].append(rcpt.address)
        return [Attempt(now, addrs, LOCAL_HOST, None, reply) for reply, addrs in by_reply.items()]

    # -- each outcome's one home -----------------------------------------------------------

    def _accepted(self, envelope: Envelope) -> None:
        if envelope.service:  # made here (a DSN, a report): the line of what made it says so
            events.accepted(envelope)

    def _outcome(
        self,
        envelope: Envelope,
        rcpt: Recipient,
        status: Status,
        reply: str,
        relay: str,
        took: float = 0.0,
        mailbox: str | None = None,
        tls: str | None = None,
    ) -> None:
        """An attempt's result for ``rcpt``: ``delivered``, ``deferred`` or ``bounced`` with
        ``reply`` (kept as its last error unless delivered). ``relay``: ``host[ip]:port``, or
        ``local`` (a Maildir, of ``mailbox``); ``tls``: the remote session's TLS (PLAINTEXT
        without; None: no session was made)."""
        rcpt.status, rcpt.last_error = status, None if status == "delivered" else reply
        if status == "deferred" and envelope.id in self._deleted:
            return  # (deleted during the attempt: it is not tried again, so not "deferred")
        events.delivery(envelope, rcpt, _transport(relay), reply, relay, took, mailbox, tls)

    def _expired(self, envelope: Envelope) -> list[Recipient]:
        """``max_queue_time`` is over: the recipients not done bounce with their last error
        (also one never tried: every attempt of it ended in an error of ours)."""
        expired = [r for r in envelope.recipients if not r.done]
        if expired:
            events.expired(envelope.id, self._clock() - envelope.created)
        for rcpt in expired:
            rcpt.status = "bounced"
            rcpt.last_error = rcpt.last_error or "4.4.7 delivery time expired"
            transport = "local" if self.is_local(rcpt.address) else "remote"
            reply = f"{rcpt.last_error} (gave up: message expired in the queue)"
            events.delivery(envelope, rcpt, transport, reply, "none", 0.0)
        return expired

    # -- remote ----------------------------------------------------------------------------

    def _remote_delivery(self) -> RemoteDelivery:
        cfg = self.cfg
        if self._remote is None:
            self._remote = RemoteDelivery(cfg, self._resolver(cfg), clock=self._clock)
            self._remote.stopping = self._draining  # (made by an attempt the stop let run)
        elif self._remote.cfg is not cfg:  # a reload: the same one, so that its cached
            # sessions get their QUIT and a stop reaches the deliveries it runs
            self._remote.reconfigure(cfg, self._resolver(cfg))
        return self._remote

    def reconfigured(self) -> None:
        """A reload came: remote delivery takes the new configuration now (its cached
        sessions, opened under the old one, get their QUIT at once), and the deliveries
        waiting for a destination's slot its new ``max_per_destination``."""
        self._destinations.relimit(self.cfg.delivery.max_per_destination)
        if self._remote is not None:
            self._remote_delivery()

    async def _deliver_domain(
        self,
        envelope: Envelope,
        domain: str,
        rcpts: list[tuple[int, Recipient]],
        dialling: _Dialling,
        kept: dict[int, DeliveryResult],
        withheld: dict[str, tuple[str, str, str | None]],
    ) -> tuple[float, list[tuple[Recipient, DeliveryResult]]]:
        """:meth:`_deliver_remote`, where an error of ours (a bug, a message it cannot handle)
        defers this domain's recipients with it, and only them: what the other domains of the
        attempt decided (a bounce owed, a success to report) is stored as it would be."""
        try:
            return await self._deliver_remote(envelope, domain, rcpts, dialling, kept)
        except DotWithheld as exc:
            # A stop, or a lease not confirmed, before this domain's final dot: what its hosts
            # decided before (a 250: sent no more) and what the other domains did is recorded
            # (a queue that no longer holds the message refuses the record, as it should);
            # the rest is left as it was, no outcome (``withheld``).
            self.services.log.info("%s: %s cut short: %s", envelope.id, domain, exc)
            relay = f"{exc.where}:{self.cfg.delivery.port}" if exc.where else "none"
            withheld[domain] = (str(exc.reply), relay, exc.tls)
            decided = []  # (temporary ones too: an earlier host's 451 is this attempt's)
            for i, (_index, rcpt) in enumerate(rcpts):
                result = kept.get(i)
                if result is not None:
                    rcpt.remote_mta = result.remote_mta
                    decided.append((rcpt, result))
            return 0.0, decided
        except LeaseLost:
            raise
        except Exception as exc:
            self._failed(f"delivery of {envelope.id} to {domain} failed", exc)
            reply = Reply(
                451, "4.3.0", (f"local error in delivery: {type(exc).__name__}",), local=True
            )
            for _i, rcpt in rcpts:  # our words: no host of an earlier attempt said them
                rcpt.remote_mta = None
            return 0.0, [
                (rcpt, DeliveryResult(ForwardPath(rcpt.address), Outcome.TEMPORARY, reply))
                for _i, rcpt in rcpts
            ]

    async def _deliver_remote(
        self,
        envelope: Envelope,
        domain: str,
        rcpts: list[tuple[int, Recipient]],
        dialling: _Dialling,
        kept: dict[int, DeliveryResult],
    ) -> tuple[float, list[tuple[Recipient, DeliveryResult]]]:
        """Hand ``rcpts`` (all in ``domain``) to remote delivery: the seconds it took, and
        each recipient with its result (a final one also in ``kept`` as it comes, by index).

        It takes a slot of the destination (``max_per_destination``), then a delivery slot
        (``max_concurrent``), and only then reads the message: waiting for a destination that
        stalls, it holds no delivery slot and no message in memory (a probe: a stalled
        domain's backlog held every delivery slot, and mail for every other domain waited).
        Always in that order, one destination at a time, so no two wait for each other."""
        outgoing = OutgoingMessage(
            sender=envelope.sender,
            recipients=tuple(
                ForwardPath(r.address, tuple(r.notify) if r.notify else None, r.orcpt)
                for _i, r in rcpts
            ),
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
        )
        limit = self.cfg.delivery.max_per_destination
        async with self._destinations.slot(domain, limit), self._slots:
            if self._draining:  # (it waited for its slots: the stop came meanwhile)
                raise DotWithheld("", NOT_TRIED)
            wire = await dialling.take()
            try:
                started = time.monotonic()
                fence = self._lease_fresh
                may_finish = None if fence is None else (lambda: fence(envelope.id))
                results = await self._remote_delivery().deliver(
                    domain,
                    outgoing,
                    wire,
                    may_finish,
                    final=kept,
                    queue_id=envelope.id,
                    marked_since=dialling.due,
                )
                took = time.monotonic() - started
            finally:
                dialling.give_back()
        out = []
        for (_index, rcpt), result in zip(rcpts, results, strict=True):
            rcpt.remote_mta = result.remote_mta
            out.append((rcpt, result))
        return took, out

    # -- DSNs ------------------------------------------------------------------------------

    def _decide_reports(
        self,
        envelope: Envelope,
        failed: list[Recipient],
        done: list[Recipient],
        relayed: AbstractSet[int],
    ) -> list[PendingReport]:
        """The DSNs (RFC 3464) this attempt owes: one for its failures, one for successes
        where NOTIFY asked (a remote success only if the host will not report it itself: the
        ids in ``relayed``). Never to the null sender (RFC 3461 §6.2, RFC 5321 §6.1);
        NOTIFY=NEVER suppresses."""
        succeeded: list[tuple[Recipient, str]] = []
        for r in done:
            if r.notify and "SUCCESS" in r.notify:
                if self.is_local(r.address):
                    succeeded.append((r, "delivered"))
                elif id(r) in relayed:
                    succeeded.append((r, "relayed"))
        failures = [r for r in failed if r.notify is None or "FAILURE" in r.notify]
        if not envelope.sender or not (failures or succeeded):
            return []  # (the path of nearly every message)
        now = self._clock()
        index = {id(r): i for i, r in enumerate(envelope.recipients)}
        out = []
        if failures:
            rcpts = [index[id(r)] for r in failures]
            out.append(PendingReport(new_queue_id(), rcpts, ["failed"] * len(rcpts), now))
        if succeeded:
            rcpts = [index[id(r)] for r, _action in succeeded]
            actions = [action for _r, action in succeeded]
            out.append(PendingReport(new_queue_id(), rcpts, actions, now))
        return out

    async def _make_reports(
        self, envelope: Envelope, original: bytes
    ) -> list[tuple[Envelope, _First]]:
        """Queue the DSNs ``envelope`` owes (its ``reports``), each kept in the queue (its
        local copies made) but not started: the caller records that they were queued, then
        starts them. A report the queue holds already was queued before a crash (it waits
        for that record, see :meth:`_deliver`). One that cannot be queued now (a full disk,
        a database away) stays owed, for the next attempt."""
        made: list[tuple[Envelope, _First]] = []
        while envelope.reports:
            pending = envelope.reports[0]
            try:  # (the look and the read too: a database away left the message unrecorded)
                if await self.queue.peek(pending.id) is None:
                    original = original or _wire(await self.queue.body(envelope))
                    report = await self._queue_report(envelope, pending, original)
                    if report is not None:
                        made.append(report)
            except LeaseLost:
                raise
            except Exception as exc:  # a full disk, a database gone, ... or a bug
                self._failed(f"{envelope.id}: a delivery status notification not queued", exc)
                break
            envelope.reports.pop(0)
        return made

    async def _queue_report(
        self, envelope: Envelope, pending: PendingReport, original: bytes
    ) -> tuple[Envelope, _First] | None:
        """Queue the DSN ``pending`` (kept, not started); None if nobody can receive it."""
        report_to = self._report_to(envelope.sender)
        if not report_to:
            self.services.log.warning(
                "%s: no DSN: the local sender <%s> is no user or alias here",
                envelope.id,
                envelope.sender,
            )
            return None
        group = [
            _dsn_recipient(envelope.recipients[i], cast(Action, action), pending.time)
            for i, action in zip(pending.recipients, pending.actions, strict=True)
        ] + [_expanded(alias, orcpt, pending.time) for alias, orcpt in pending.expanded]
        # Delivered here, it gets the Received line every delivery adds; RFC 5321 §4.4's
        # form for a message made on this host.
        received = (
            f"Received: by {self.cfg.hostname} (postroom) id {pending.id};"
            f"\r\n\t{format_date(pending.time)}\r\n"
        )
        message = received.encode() + build_dsn(
            hostname=self.cfg.hostname,
            sender=envelope.sender,
            recipients=group,
            original=original,
            arrival=envelope.created,
            now=pending.time,
            envid=envelope.envid,
            ret=envelope.ret,
            queue_id=envelope.id,
        )
        if self.services.sender_auth is not None:  # DKIM, so that it passes DMARC
            if not all(self.is_local(address) for address in report_to):
                # Made 7-bit before it is signed, as submitted mail that leaves: a hop without
                # 8BITMIME would convert its message/global parts and break the signatures.
                message = mime_downgrade.downgrade(message, eight_bit=False)
            message = self.services.sender_auth.sign_own(message) + message
        report = self._made_here("", report_to, pending.id, parent=envelope.id)
        draft = self.queue.draft(report.id, "")
        draft.write(message)
        first = await self._store(report, draft, hold=True)
        events.bounce_queued(envelope.id, report.id, envelope.sender, group[0].action)
        return report, first

    async def _owed_by_parent(self, report: Envelope) -> bool:
        """Whether the message a DSN reports on still lists it as owed (it was queued just
        before a crash, and that message's record of it was not stored)."""
        parent = await self.queue.peek(report.parent)
        return parent is not None and any(p.id == report.id for p in parent.reports)

    def _report_to(self, sender: str) -> list[str]:
        """Where a DSN for ``sender`` goes. A remote sender gets it; a local one through its
        aliases, like any local recipient. A local address that is no user or alias was made
        up (anyone may send from it to the MX port): nobody, and no Maildir is made for it."""
        if not self.is_local(sender):
            return [sender]
        local, _, domain = sender.rpartition("@")
        return self.services.accounts.resolve(f"{local_key(local)}@{domain}") or []


def _transport(relay: str) -> str:
    return "local" if relay == LOCAL_HOST else "remote"


def _of(envelope: Envelope, copies: list[LocalCopy]) -> list[tuple[int, Recipient]]:
    return [(c.index, envelope.recipients[c.index]) for c in copies]


def _wire(message: bytes) -> bytes:
    """The stored message as SMTP sends it: without the Return-Path line, CRLF line ends
    (lossless: SMTP refused bare CR and LF on the way in)."""
    if message.startswith(b"Return-Path:"):
        message = message[message.find(b"\n") + 1 :]
    return to_crlf(message)


_DomainTask = asyncio.Task[tuple[float, list[tuple[Recipient, DeliveryResult]]]]


def _outcomes(done: set[_DomainTask]) -> set[Outcome]:
    return {result.outcome for task in done for _rcpt, result in task.result()[1]}


async def _failing_with(pending: set[_DomainTask]) -> tuple[set[_DomainTask], set[_DomainTask]]:
    """The domains decided within BOUNCE_TOGETHER after some failed (done, still pending):
    those that fail at once (a null MX and a name that does not exist, both decided by DNS)
    share one bounce. One that delivers ends the wait: its outcome is stored at once."""
    done: set[_DomainTask] = set()
    deadline = time.monotonic() + BOUNCE_TOGETHER
    while pending and (left := deadline - time.monotonic()) > 0:
        more, pending = await asyncio.wait(
            pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
        )
        done |= more
        if not more or Outcome.DELIVERED in _outcomes(more):
            break
    return done, pending


def _owes(failed: list[Recipient], done: list[Recipient]) -> bool:
    """Might a DSN be owed for these outcomes (a bounce, or NOTIFY=SUCCESS)?"""
    return bool(failed) or any(r.notify and "SUCCESS" in r.notify for r in done)


def _attempts(now: float, results: list[tuple[Recipient, DeliveryResult]]) -> list[Attempt]:
    """One attempt per host and reply: the recipients that got it."""
    grouped: dict[tuple[str | None, str | None, bool, str], list[str]] = defaultdict(list)
    for rcpt, result in results:
        secure = result.tls not in (None, PLAINTEXT)
        key = (result.host or result.remote_mta, result.ip, secure, str(result.reply))
        grouped[key].append(rcpt.address)
    return [
        Attempt(now, addrs, host, ip, reply, tls)
        for (host, ip, tls, reply), addrs in grouped.items()
    ]


def _expanded(alias: str, orcpt: str | None, now: float) -> DsnRecipient:
    """The block for an alias of several addresses: RFC 3461 §6.2.7.3, the alias itself, as
    RCPT named it (Original-Recipient only from its ORCPT, RFC 3464 §2.3.1)."""
    return DsnRecipient(
        final_recipient=alias,
        action="expanded",
        status="2.0.0",
        original_recipient=orcpt,
        diagnostic="alias expanded",
        last_attempt=now,
    )


def _dsn_recipient(rcpt: Recipient, action: Action, now: float) -> DsnRecipient:
    if action == "expanded":  # (stored before the alias had a field of its own: its member)
        return _expanded(rcpt.original or rcpt.address, rcpt.orcpt, now)
    error = rcpt.last_error or ""
    status = failure_status(error) if action == "failed" else "2.0.0"
    original = rcpt.orcpt
    if original is None and rcpt.original:  # the alias it was sent to, as ORCPT would carry it
        kind = "rfc822" if rcpt.original.isascii() else "utf-8"
        original = f"{kind};{xtext_encode(rcpt.original)}"
    return DsnRecipient(
        final_recipient=rcpt.address,
        action=action,
        status=status,
        original_recipient=original,
        remote_mta=rcpt.remote_mta,
        diagnostic=error or None,
        last_attempt=now,
    )
