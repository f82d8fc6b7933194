"""The queue runner: delivers queued messages, retries deferred ones, bounces what never works.

New messages arrive from the SMTP sessions through :meth:`QueueRunner.submit` and are tried at
once. Each attempt splits the recipients by domain: local ones go to Maildir delivery, remote
ones to ``delivery/remote.py``, one transaction per destination domain. Before a remote host is
dialled the attempt count and the next retry time are written to the state file (as mox does),
so a crash can never turn into a hot retry loop. A recipient ends ``delivered`` or ``bounced``
(with a DSN to the sender, RFC 3464, never to ``<>``), or stays ``deferred`` until its next
attempt or ``max_queue_time``. At start-up :meth:`recover` reloads the spool before any listener
opens, re-checking local deliveries that a crash may have interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from postroom import events, privileges
from postroom.delivery.dsn import Action, DsnRecipient, build_dsn, format_date
from postroom.delivery.local import LocalDelivery
from postroom.delivery.remote import RemoteDelivery, needs_relayed_dsn
from postroom.errors import QueueError
from postroom.queue import schedule
from postroom.queue.store import Envelope, Recipient, new_queue_id
from postroom.resolver import DnsResolver
from postroom.smtp.client_engine import Message, Outcome
from postroom.smtp.client_engine import Recipient as ClientRecipient
from postroom.wire import replies

if TYPE_CHECKING:
    from postroom.config import Config
    from postroom.services import Services


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class QueueRunner:
    """Owns the in-memory schedule of the spool; one per server."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = services.store
        self.local = LocalDelivery(
            services.cfg.data_dir,
            services.cfg.hostname,
            privileges.target_ids(services.cfg),
            services.cpus[1] if services.cpus else None,
        )
        self._heap: list[tuple[float, str]] = []
        self._next: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._recovered: set[str] = set()
        self._deleted: set[str] = set()  # deleted by the admin during their attempt
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(services.cfg.delivery.max_concurrent)
        self._stopping = False
        self._remote: RemoteDelivery | None = None
        self._destinations: dict[str, asyncio.Semaphore] = {}
        self._relayed: set[int] = set()
        self._forwarding: set[asyncio.Task[None]] = set()
        self._rng = random.Random()

    # -- entry points --------------------------------------------------------------------------

    def submit(self, envelope: Envelope) -> None:
        """A message was just committed to the spool: try it now (in the primary worker)."""
        if self.services.primary:
            self._start(envelope)
        else:
            task = asyncio.get_running_loop().create_task(self._forward(envelope.id))
            self._forwarding.add(task)
            task.add_done_callback(self._forwarding.discard)

    async def _forward(self, queue_id: str) -> None:
        """Tell the primary worker about a message this worker spooled."""
        path = str(self.cfg.data_dir / "control.sock")
        for attempt in range(50):
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(f"submit {queue_id}\n".encode())
                await writer.drain()
                await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1 * (attempt + 1))
        self.services.log.error(
            "could not hand %s to the queue runner; it is delivered "
            "at the next start or queue flush",
            queue_id,
        )

    def submit_id(self, queue_id: str) -> bool:
        """The control socket's ``submit``: load a spooled message and try it now."""
        try:
            self._start(self.store.load(queue_id))
        except QueueError:
            return False
        return True

    def flush(self) -> int:
        """``queue flush``: every deferred message is due now. Returns how many there are."""
        now = time.time()
        for qid in list(self._next):
            self._schedule(qid, now)
        self._wake.set()
        return len(self._next)

    async def delete(self, queue_id: str) -> bool:
        """``queue delete``: remove the message now. An attempt in progress goes on with the
        copy it holds, but nothing is retried, reported or saved for it afterwards."""
        self._next.pop(queue_id, None)
        try:
            self.store.remove(queue_id)
        except QueueError:
            return False
        if queue_id in self._inflight:
            self._deleted.add(queue_id)
        return True

    async def recover(self) -> None:
        """Start-up: drop half-written files, reload the spool, schedule what is left."""
        dropped = self.store.clean_tmp()
        if dropped:
            self.services.log.info("removed %d incomplete spool files", dropped)
        now = time.time()
        for item in self.store.iter_envelopes():
            if isinstance(item, QueueError):
                qid = str(item).split(":")[0]
                self.services.log.error("corrupt queue file: %s", item)
                with contextlib.suppress(OSError):
                    moved = self.store.quarantine(qid)
                    self.services.log.error("moved %s aside to %s", qid, moved)
                continue
            self._recovered.add(item.id)
            self._schedule(
                item.id, min(item.next_attempt, now) if item.attempts == 0 else item.next_attempt
            )

    async def run(self) -> None:
        """Start due attempts until stopped."""
        while not self._stopping:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                due, qid = heapq.heappop(self._heap)
                if self._next.get(qid) != due or qid in self._inflight:
                    continue
                del self._next[qid]
                try:
                    envelope = self.store.load(qid)
                except QueueError as exc:
                    self.services.log.error("cannot load %s: %s", qid, exc)
                    continue
                self._start(envelope)
            wait = self._heap[0][0] - now if self._heap else 60.0
            if self._remote is not None:
                await self._remote.close_idle()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(wait, 5.0)))

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
        if self._remote is not None:
            await self._remote.aclose()
        await self.local.close()

    # -- scheduling ----------------------------------------------------------------------------

    def _schedule(self, qid: str, when: float) -> None:
        self._next[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._wake.set()

    def _start(self, envelope: Envelope) -> None:
        if envelope.id in self._inflight or self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._attempt(envelope))
        self._inflight[envelope.id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(envelope.id, None))

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, envelope: Envelope) -> None:
        async with self._slots:
            try:
                await self._deliver(envelope)
            except Exception:
                self.services.log.exception("delivery of %s failed", envelope.id)
                # Try again later rather than lose it or spin.
                self._schedule(envelope.id, time.time() + self.cfg.delivery.retry_intervals[0])
            if envelope.id in self._deleted:  # queue delete came during the attempt
                self._deleted.discard(envelope.id)
                self._next.pop(envelope.id, None)
                self.store.forget_state(envelope.id)  # in case the attempt saved it since

    async def _deliver(self, envelope: Envelope) -> None:
        try:
            message = await self.store.io.run(self.store.message, envelope)
        except FileNotFoundError:
            return  # deleted meanwhile
        recovering = envelope.id in self._recovered
        self._recovered.discard(envelope.id)
        now = time.time()
        changed = False
        local: list[tuple[int, Recipient]] = []
        remote: dict[str, list[tuple[int, Recipient]]] = defaultdict(list)
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.done:
                continue
            if self.cfg.is_local_domain(domain_of(rcpt.address)):
                local.append((index, rcpt))
            else:
                remote[domain_of(rcpt.address)].append((index, rcpt))

        newly_failed: list[Recipient] = []
        newly_done: list[Recipient] = []
        for index, rcpt in list(local):
            # The account may have gone since RCPT (user del): no Maildir for it, a bounce.
            if not self.services.accounts.has_mailbox(rcpt.address):
                local.remove((index, rcpt))
                rcpt.status = "bounced"
                rcpt.last_error = str(replies.USER_UNKNOWN_NOW)
                newly_failed.append(rcpt)
                changed = True
                self._report_local(envelope, rcpt, 0.0)
        started = time.monotonic()
        errors = await self.local.deliver(
            envelope, [(i, r.address) for i, r in local], message, check_duplicate=recovering
        )
        took = time.monotonic() - started
        for (_index, rcpt), error in zip(local, errors, strict=True):
            if error is not None:
                rcpt.status = "deferred"
                rcpt.last_error = f"451 4.3.0 local delivery failed: {error.strerror or error}"
                changed = True
            else:
                rcpt.status = "delivered"
                newly_done.append(rcpt)
            self._report_local(envelope, rcpt, took)

        if remote:
            envelope.attempts += 1
            envelope.last_attempt = now
            envelope.next_attempt = schedule.next_attempt(
                now,
                envelope.attempts,
                self.cfg.delivery.retry_intervals,
                jitter=self._rng.uniform(0, 0.1),
                deadline=envelope.created + self.cfg.delivery.max_queue_time,
            )
            # Written before dialling: a crash now cannot cause an immediate retry loop.
            await self.store.io.run(self.store.save_state, envelope)
            results = await asyncio.gather(
                *(
                    self._deliver_remote(envelope, domain, rcpts, message)
                    for domain, rcpts in remote.items()
                )
            )
            for outcome in results:
                for rcpt in outcome:
                    if rcpt.status == "bounced":
                        newly_failed.append(rcpt)
                    elif rcpt.status == "delivered":
                        newly_done.append(rcpt)
            changed = True

        if envelope.id in self._deleted:
            return  # queue delete came during the attempt: no bounce, no retry

        # Deferred recipients past max_queue_time bounce with their last error.
        if schedule.expired(envelope.created, time.time(), self.cfg.delivery.max_queue_time):
            expired = [r for r in envelope.recipients if r.status == "deferred"]
            if expired:
                events.expired(envelope.id, time.time() - envelope.created)
            for rcpt in expired:
                rcpt.status = "bounced"
                rcpt.last_error = rcpt.last_error or "4.4.7 delivery time expired"
                newly_failed.append(rcpt)
                changed = True
                events.delivery(
                    envelope.id,
                    rcpt.address,
                    "local" if self.is_local(rcpt.address) else "remote",
                    "bounced",
                    f"{rcpt.last_error} (gave up: message expired in the queue)",
                    arrived=envelope.created,
                    seconds=0.0,
                    relay="none",
                    orig_to=rcpt.original,
                )

        await self._notify(envelope, message, newly_failed, newly_done)

        if all(r.done for r in envelope.recipients):
            await self._remove(envelope.id)
            return
        if not remote:
            # Only local temporary failures: count the attempt here.
            envelope.attempts += 1
            envelope.last_attempt = now
            envelope.next_attempt = schedule.next_attempt(
                now,
                envelope.attempts,
                self.cfg.delivery.retry_intervals,
                deadline=envelope.created + self.cfg.delivery.max_queue_time,
            )
        if changed:
            await self.store.io.run(self.store.save_state, envelope)
        self._schedule(envelope.id, envelope.next_attempt)

    def _report_local(self, envelope: Envelope, rcpt: Recipient, seconds: float) -> None:
        delivered = rcpt.status == "delivered"
        events.delivery(
            envelope.id,
            rcpt.address,
            "local",
            rcpt.status,
            "delivered to maildir" if delivered else rcpt.last_error or "",
            arrived=envelope.created,
            seconds=seconds,
            relay="local",
            orig_to=rcpt.original,
            mailbox=self.local.mailbox(rcpt.address),
        )

    async def _remove(self, queue_id: str) -> None:
        """Forget a finished message; the unlink is made durable with a shared dir fsync."""
        with contextlib.suppress(QueueError):
            await self.store.io.run(self.store.remove, queue_id)
        await self.store.msg_sync.sync()

    async def deliver_direct(self, envelope: Envelope, message: bytes) -> bool:
        """Deliver a just-received, all-local message straight into the Maildirs.

        The Maildir writer's journal makes the message as durable as a spool file would (one
        shared fdatasync), so for the common case of an MX receiving mail for its own users the
        spool is skipped: one journal append and one file per recipient. Returns False if
        any delivery failed; the caller then spools the message for the recipients left, which
        the runner retries (delivered ones are marked done and not delivered again).
        """
        errors = await self.local.deliver(
            envelope, [(i, r.address) for i, r in enumerate(envelope.recipients)], message
        )
        ok = True
        for rcpt, error in zip(envelope.recipients, errors, strict=True):
            if error is not None:
                rcpt.last_error = f"451 4.3.0 local delivery failed: {error}"
                ok = False
            else:
                rcpt.status = "delivered"
        return ok

    def report_direct(self, envelope: Envelope, seconds: float) -> None:
        """Log the copies :meth:`deliver_direct` made, once the message was accepted."""
        for rcpt in envelope.recipients:
            if rcpt.status == "delivered":
                self._report_local(envelope, rcpt, seconds)

    @property
    def cfg(self) -> Config:
        """The configuration now: SIGHUP replaces it (a domain added is local from then on)."""
        return self.services.cfg

    async def withdraw_direct(self, envelope: Envelope, message: bytes) -> None:
        """Undo the copies :meth:`deliver_direct` made when the message is refused after all
        (the rest could not be spooled): the client sends it again, to every recipient."""
        done = [
            (i, r.address) for i, r in enumerate(envelope.recipients) if r.status == "delivered"
        ]
        if done:
            await self.store.io.run(self.local.withdraw, envelope, done, message)

    def is_local(self, address: str) -> bool:
        return self.cfg.is_local_domain(domain_of(address))

    def _remote_delivery(self) -> RemoteDelivery:
        cfg = self.cfg
        if self._remote is None or self._remote.cfg is not cfg:  # new after a reload
            self._remote = RemoteDelivery(cfg, DnsResolver(cfg.dns))
        return self._remote

    async def _deliver_remote(
        self, envelope: Envelope, domain: str, rcpts: list[tuple[int, Recipient]], message: bytes
    ) -> list[Recipient]:
        """Hand ``rcpts`` (all in ``domain``) to remote delivery; updates and returns them."""
        outgoing = Message(
            sender=envelope.sender,
            recipients=tuple(
                ClientRecipient(r.address, tuple(r.notify) if r.notify else None, r.orcpt)
                for _i, r in rcpts
            ),
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
        )
        slot = self._destinations.setdefault(
            domain, asyncio.Semaphore(self.cfg.delivery.max_per_destination)
        )
        async with slot:
            started = time.monotonic()
            results = await self._remote_delivery().deliver(domain, outgoing, message)
            took = time.monotonic() - started
        port = self.cfg.delivery.port
        for (_index, rcpt), result in zip(rcpts, results, strict=True):
            rcpt.remote_mta = result.remote_mta
            text = str(result.reply)
            if result.outcome is Outcome.DELIVERED:
                rcpt.status = "delivered"
                rcpt.last_error = None
                if needs_relayed_dsn(result):
                    self._relayed.add(id(rcpt))
            elif result.outcome is Outcome.PERMANENT:
                rcpt.status = "bounced"
                rcpt.last_error = text
            else:
                rcpt.status = "deferred"
                rcpt.last_error = text
            events.delivery(
                envelope.id,
                rcpt.address,
                "remote",
                rcpt.status,
                result.reply,
                arrived=envelope.created,
                seconds=took,
                relay=f"{result.remote_mta}[{result.remote_ip}]:{port}"
                if result.remote_mta
                else "none",
                orig_to=rcpt.original,
            )
        return [r for _i, r in rcpts]

    async def _notify(
        self, envelope: Envelope, message: bytes, failed: list[Recipient], done: list[Recipient]
    ) -> None:
        """Queue DSNs (RFC 3464) for this attempt's failures, and successes where NOTIFY asked.

        Never to the null sender (RFC 3461 §6.2, RFC 5321 §6.1); NOTIFY=NEVER suppresses.
        """
        if not envelope.sender:
            return
        now = time.time()
        failures = [
            _dsn_recipient(r, "failed", now)
            for r in failed
            if r.notify is None or "FAILURE" in r.notify
        ]
        successes = []
        for r in done:
            if r.notify and "SUCCESS" in r.notify:
                local = self.cfg.is_local_domain(domain_of(r.address))
                if local or id(r) in self._relayed:
                    successes.append(_dsn_recipient(r, "delivered" if local else "relayed", now))
                self._relayed.discard(id(r))
        report_to = self._report_to(envelope.sender)
        if (failures or successes) and not report_to:
            self.services.log.warning(
                "%s: no DSN: the local sender <%s> is no user or alias here",
                envelope.id,
                envelope.sender,
            )
            return
        for group in (failures, successes):
            if not group:
                continue
            bounce_id = new_queue_id()
            # Delivered here, it gets the Received line every delivery adds (CONTRACT.md
            # "Mailboxes"); RFC 5321 §4.4's form for a message made on this host.
            received = (
                f"Received: by {self.cfg.hostname} (postroom) id {bounce_id};"
                f"\r\n\t{format_date(now)}\r\n"
            )
            report = received.encode() + build_dsn(
                hostname=self.cfg.hostname,
                sender=envelope.sender,
                recipients=group,
                original=message,
                arrival=envelope.created,
                now=now,
                envid=envelope.envid,
                ret=envelope.ret,
                queue_id=envelope.id,
            )
            bounce = Envelope(
                id=bounce_id,
                sender="",
                recipients=[Recipient(address) for address in report_to],
                created=now,
                is_bounce=True,
                smtputf8=not envelope.sender.isascii(),
            )
            await self.store.add(bounce, report)
            events.bounce_queued(envelope.id, bounce.id, envelope.sender, group[0].action)
            self._start(bounce)

    def _report_to(self, sender: str) -> list[str]:
        """Where a DSN for ``sender`` goes. A remote sender gets it; a local one through its
        aliases, like any local recipient. A local address that is no user or alias was made
        up (anyone may send from it to the MX port): nobody, and no Maildir is made for it."""
        if not self.is_local(sender):
            return [sender]
        local, _, domain = sender.rpartition("@")
        return self.services.accounts.resolve(f"{local.lower()}@{domain}") or []


_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def _dsn_recipient(rcpt: Recipient, action: Action, now: float) -> DsnRecipient:
    error = rcpt.last_error or ""
    match = _STATUS.search(error)
    if action == "failed":
        status = match.group(1) if match else ("5.0.0" if error.startswith("5") else "4.4.7")
        if status.startswith("2"):
            status = "5.0.0"
    else:
        status = "2.0.0"
    original = rcpt.orcpt or (f"rfc822;{rcpt.original}" if rcpt.original else None)
    return DsnRecipient(
        final_recipient=rcpt.address,
        action=action,
        status=status,
        original_recipient=original,
        remote_mta=rcpt.remote_mta,
        diagnostic=error or None,
        last_attempt=now,
    )
