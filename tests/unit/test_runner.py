"""The queue runner with an injected resolver, clock and jitter, over an in-memory queue: every
outcome (delivered, deferred, bounced, expired) without sockets, DNS or sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from postroom import config as config_mod
from postroom.delivery.remote import DeliveryResult
from postroom.queue import runner as runner_mod
from postroom.queue.envelope import Attempt, Envelope, PendingReport, Recipient
from postroom.queue.runner import Accepted, QueueRunner
from postroom.resolver import Route, RouteFailure, StaticResolver
from postroom.smtp.client_engine import Outcome
from postroom.storage.interfaces import LocalCopy, MessageDraft
from postroom.wire.replies import Reply

NOW = 1_800_000_000.0


class FakeRemote:
    """What the runner asks of remote delivery besides ``deliver`` (a test's subclass)."""

    stopping = False
    committing = 0

    async def aclose(self) -> None:
        pass


QUEUED = Reply(250, "2.0.0", ("queued",))


def delivered(outgoing: Any, *, dsn_offered: bool = False) -> list[DeliveryResult]:
    """A host's 250 to every recipient of ``outgoing``."""
    return [
        DeliveryResult(r, Outcome.DELIVERED, QUEUED, "mx", dsn_offered=dsn_offered)
        for r in outgoing.recipients
    ]


def use_remote(runner: QueueRunner, remote: Any) -> None:
    """Remote delivery for ``runner``'s attempts: ``remote`` (a FakeRemote)."""
    runner._remote = remote
    runner._remote_delivery = lambda: remote  # type: ignore[method-assign]


class MemoryDraft:
    def __init__(self, sender: str) -> None:
        self.data = f"Return-Path: <{sender}>\n".encode()

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, data: bytes) -> None:
        self.data += data.replace(b"\r\n", b"\n")

    def head(self, limit: int) -> bytes:
        return self.data[:limit]

    def abort(self) -> None:
        self.data = b""


class Crash(BaseException):
    """kill -9: raised right after the call that stored something (nothing catches it)."""


class MemoryQueue:
    """What the runner asks of a queue, kept in dicts; every call is recorded. ``stored`` is
    what a disk would hold (the JSON of each message as last stored, and its octets):
    :meth:`restarted` is the queue a new process finds. ``crash_after`` calls, it crashes."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[Envelope, bytes]] = {}
        self.stored: dict[str, tuple[bytes, bytes]] = {}
        self.accepted: dict[str, tuple[Envelope, bytes]] = {}
        self.calls: list[tuple[str, str]] = []
        self.failing_copies: set[str] = set()
        self.crash_after: int | None = None
        self.twice: list[str] = []
        # The Maildirs: every copy made, and what its file name depends on.
        self.delivered: list[tuple[str, str]] = []
        self.names: set[tuple[str, str, float]] = set()

    def _call(self, kind: str, envelope: Envelope, raw: bytes | None = None) -> None:
        self.calls.append((kind, envelope.id))
        if envelope.id in self.messages:
            body = self.messages[envelope.id][1]
            self.stored[envelope.id] = (raw or envelope.to_json(), body)
        else:
            self.stored.pop(envelope.id, None)
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise Crash

    def copy(self, envelope: Envelope, mailbox: str, error: OSError) -> OSError | None:
        """Make one Maildir copy (``error`` for a failing mailbox)."""
        if mailbox in self.failing_copies:
            return error
        if (envelope.id, mailbox, envelope.created) not in self.names:
            # (A copy made again after a crash has the same name: there is one file.)
            self.names.add((envelope.id, mailbox, envelope.created))
            self.delivered.append((envelope.id, mailbox))
        return None

    def restarted(self) -> MemoryQueue:
        queue = MemoryQueue()
        queue.failing_copies = self.failing_copies
        queue.delivered, queue.names = self.delivered, self.names
        for qid, (raw, body) in self.stored.items():
            queue.messages[qid] = (Envelope.from_json(raw), body)
        queue.stored = dict(self.stored)
        return queue

    def draft(
        self, queue_id: str, sender: str, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> MemoryDraft:
        return MemoryDraft(sender)

    async def accept(
        self,
        envelope: Envelope,
        draft: MessageDraft,
        deliver_now: Sequence[LocalCopy],
        hold: bool = False,
    ) -> list[OSError | None]:
        assert isinstance(draft, MemoryDraft)
        if envelope.id in self.messages:
            self.twice.append(envelope.id)  # a real queue would hold two entries
        self.messages[envelope.id] = self.accepted[envelope.id] = (envelope, draft.data)
        full = OSError(28, "No space left on device")
        results = [self.copy(envelope, c.mailbox, full) for c in deliver_now]
        stored = envelope.to_dict()  # stored with the copies made in the same commit
        for c, error in zip(deliver_now, results, strict=True):
            if error is None:
                stored["recipients"][c.index]["status"] = "delivered"
        self._call("accept", envelope, json.dumps(stored).encode())
        return results

    async def claim(self, now: float, limit: int) -> list[Envelope]:
        due = [e for e, _b in self.messages.values() if e.next_attempt <= now]
        return sorted(due, key=lambda e: e.next_attempt)[:limit]  # oldest due first

    async def begin_attempt(self, envelope: Envelope) -> None:
        self._call("begin", envelope)

    async def save(self, envelope: Envelope) -> None:
        self._call("save", envelope)

    async def peek(self, queue_id: str) -> Envelope | None:
        found = self.messages.get(queue_id)
        return None if found is None else found[0]

    async def body(self, envelope: Envelope) -> bytes:
        return self.messages[envelope.id][1]

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        self._call("record", envelope)

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        del self.messages[envelope.id]
        self._call("finish", envelope)

    async def delete(self, queue_id: str) -> None:
        del self.messages[queue_id]
        self.stored.pop(queue_id, None)

    def entries(self) -> list[Envelope]:
        return [e for e, _b in self.messages.values()]

    def load(self, queue_id: str) -> Envelope:
        return self.messages[queue_id][0]

    def head(self, envelope: Envelope, limit: int = 65536) -> bytes:
        return self.messages[envelope.id][1][:limit]

    def flush(self) -> int:
        return 0

    def problems(self) -> list[str]:
        return []

    async def wait(self, timeout: float) -> None:
        return None


class MemoryMailboxes:
    def __init__(self, queue: MemoryQueue) -> None:
        self.queue = queue

    @property
    def delivered(self) -> list[tuple[str, str]]:
        return self.queue.delivered

    async def deliver(
        self, envelope: Envelope, copies: Sequence[LocalCopy]
    ) -> list[OSError | None]:
        denied = OSError(13, "Permission denied")
        return [self.queue.copy(envelope, c.mailbox, denied) for c in copies]


class Accounts:
    def expand(self, key: str, max_depth: int = 10) -> list[str] | None:
        return [key] if key.startswith("alice@") else None

    def resolve(self, key: str) -> list[str] | None:
        return self.expand(key)

    def has_mailbox(self, key: str) -> bool:
        return key.startswith("alice@")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, routes: dict[str, Route | RouteFailure]) -> tuple[Any, ...]:
    cfg = config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(tmp_path),
            "delivery": {"retry_intervals": ["5m", "1h"], "max_queue_time": "1d"},
        }
    )

    class Services:
        pass

    services: Any = Services()
    services.cfg = cfg
    services.log = logging.getLogger("test-runner")
    services.accounts = Accounts()
    services.sender_auth = None
    queue = MemoryQueue()
    services.queue = queue
    mailboxes = MemoryMailboxes(queue)
    clock = Clock()
    resolver = StaticResolver(routes)
    runner = QueueRunner(
        services, queue, mailboxes, resolver=lambda _cfg: resolver, clock=clock, jitter=lambda: 0.0
    )
    return runner, queue, mailboxes, clock


def envelope(qid: str, *rcpts: str, sender: str = "alice@a.test") -> Envelope:
    return Envelope(qid, sender, [Recipient(r) for r in rcpts], NOW)


async def hand_over(runner: QueueRunner, env: Envelope) -> None:
    """Accept ``env`` (a small message) and go on while its first attempt runs."""
    draft = runner.queue.draft(env.id, env.sender)
    draft.write(b"Subject: t\r\n\r\nbody\r\n")
    await runner.accept(env, draft)


async def accept(runner: QueueRunner, env: Envelope) -> Accepted:
    draft = runner.queue.draft(env.id, env.sender)
    draft.write(b"Subject: t\r\n\r\nbody\r\n")
    result = await runner.accept(env, draft)
    assert isinstance(result, Accepted)
    await settle(runner)
    return result


def crash_then_run_on(
    runner: QueueRunner,
    boxes: Any,
    clock: Any,
    env: Envelope,
    *,
    step: float,
    rounds: int,
    remote: Any = None,
) -> MemoryQueue:
    """Accept ``env`` until the queue's simulated kill -9 (``crash_after``), then start again
    and run the schedule, ``step`` seconds at a time, at most ``rounds`` times, until the
    queue is empty; the restarted queue. ``remote``: the remote delivery of both runs."""
    if remote is not None:
        use_remote(runner, remote)

    async def first_run() -> None:
        with contextlib.suppress(Crash):
            await accept(runner, env)
        for task in runner._inflight.values():
            task.cancel()  # the process is gone

    asyncio.run(first_run())
    queue = boxes.queue = boxes.queue.restarted()
    again = QueueRunner(
        runner.services, queue, boxes, runner._resolver, clock=clock, jitter=lambda: 0.0
    )
    if remote is not None:
        use_remote(again, remote)

    async def later_runs() -> None:
        for _ in range(rounds):  # the restart, then the runner's schedule
            if not queue.messages:
                return
            clock.now += step
            for due in await queue.claim(clock.now, 100):
                again._start(due)
            await settle(again)

    asyncio.run(later_runs())
    return queue


async def settle(runner: QueueRunner) -> None:
    """Wait for every attempt, those the attempts start (a DSN) included."""
    for _ in range(10):
        if not runner._inflight:
            return
        await asyncio.gather(*runner._inflight.values())


def test_a_temporary_failure_defers_with_the_first_attempt_recorded_at_acceptance(
    tmp_path: Path,
) -> None:
    runner, queue, _boxes, clock = make(
        tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL for b.test")}
    )
    env = envelope("Q1", "bob@b.test", "alice@a.test")
    asyncio.run(accept(runner, env))
    assert env.attempts == 1 and env.next_attempt == NOW + 300  # before the first dial
    # No begin_attempt: the record that made it durable holds the first attempt.
    assert queue.calls == [("accept", "Q1"), ("record", "Q1")]
    assert [r.status for r in env.recipients] == ["deferred", "delivered"]
    local, remote = env.history
    assert (local.host, local.recipients) == ("local", ["alice@a.test"])
    assert (remote.host, remote.ip, remote.recipients) == (None, None, ["bob@b.test"])
    assert "4.4.3" in remote.reply

    async def retry() -> None:  # the next attempt stores its count before dialling
        clock.now = env.next_attempt
        runner._start(env)
        await asyncio.gather(*runner._inflight.values())

    asyncio.run(retry())
    assert queue.calls[-2:] == [("begin", "Q1"), ("record", "Q1")]
    assert env.attempts == 2 and env.next_attempt == clock.now + 3600


def test_the_wait_before_a_retry_runs_from_the_end_of_the_attempt(tmp_path: Path) -> None:
    # RFC 5321 §4.5.4.1: the retry waits "after one attempt has failed". The wait was counted
    # from the attempt's start: a host that held each attempt longer than the wait (a tarpit
    # answering 421 after 6 s, against a 4 s wait; the 5-minute greeting time-out against the
    # first 5-minute wait) was dialled again the moment it failed.
    runner, _queue, _boxes, clock = make(tmp_path, {})
    dials: list[float] = []
    busy = Reply(421, "4.3.2", ("busy",))

    class Tarpit(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            dials.append(clock.now)
            clock.now += 400  # longer than the first wait (5m)
            return [DeliveryResult(r, Outcome.TEMPORARY, busy, "mx") for r in outgoing.recipients]

    use_remote(runner, Tarpit())
    env = envelope("Q1", "bob@slow.test")
    asyncio.run(accept(runner, env))
    assert dials == [NOW] and env.next_attempt == NOW + 400 + 300

    async def retry() -> None:
        clock.now = env.next_attempt
        runner._start(env)
        await settle(runner)

    asyncio.run(retry())
    assert dials == [NOW, NOW + 700] and env.next_attempt == NOW + 1100 + 3600


def test_a_permanent_failure_bounces_to_the_sender_through_the_same_hand_off(
    tmp_path: Path,
) -> None:
    runner, queue, boxes, _clock = make(tmp_path, {})  # every domain: NXDOMAIN
    env = envelope("Q1", "bob@nowhere.test")
    asyncio.run(accept(runner, env))
    assert env.recipients[0].status == "bounced"
    (dsn_id,) = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
    # The outcome with the DSN it owes is stored first, the DSN queued, the outcome recorded,
    # and only then is the DSN delivered.
    assert queue.calls == [
        ("accept", "Q1"),
        ("save", "Q1"),
        ("accept", dsn_id),
        ("finish", "Q1"),
        ("finish", dsn_id),
    ]
    assert not queue.messages and boxes.delivered == [(dsn_id, "alice@a.test")]
    dsn, report = queue.accepted[dsn_id]
    assert dsn.sender == "" and dsn.parent == "Q1"
    assert [(r.address, r.status) for r in dsn.recipients] == [("alice@a.test", "delivered")]
    assert b"multipart/report" in report and b"\r\n" not in report


def test_a_bounce_the_database_cannot_look_up_stays_owed_and_the_outcome_recorded(
    tmp_path: Path,
) -> None:
    """A pgcrash probe: the look whether a DSN was queued already (and the read of the
    message) ran outside the DSN's error handling; a database away there left the message
    unrecorded, leased for as long as its node ran."""
    from postroom.errors import StorageUnavailable

    runner, queue, _boxes, _clock = make(tmp_path, {})  # every domain: NXDOMAIN
    away = True

    async def peek(queue_id: str) -> Envelope | None:
        if away:
            raise StorageUnavailable("PostgreSQL: connection refused")
        found = queue.messages.get(queue_id)
        return None if found is None else found[0]

    queue.peek = peek
    env = envelope("Q1", "bob@nowhere.test")
    asyncio.run(accept(runner, env))
    assert [kind for kind, qid in queue.calls] == ["accept", "save", "record"]
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert stored.recipients[0].status == "bounced" and len(stored.reports) == 1
    away = False  # back: the next attempt sends the bounce it owes, once
    asyncio.run(runner._deliver(stored, None))
    assert len([1 for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]) == 1


def test_a_bounce_names_the_alias_as_original_recipient(tmp_path: Path) -> None:
    """RFC 3464 §2.3.1: the address as the sender gave it; "+c3" in it is no xtext escape."""
    runner, queue, _boxes, _clock = make(tmp_path, {})
    env = Envelope(
        "Q1", "alice@a.test", [Recipient("bob@nowhere.test", original="ab+c3@a.test")], NOW
    )
    asyncio.run(accept(runner, env))
    (dsn_id,) = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
    assert b"\nOriginal-Recipient: rfc822; ab+c3@a.test\n" in queue.accepted[dsn_id][1]


def test_an_expanded_alias_is_reported_once_by_the_first_attempt(tmp_path: Path) -> None:
    """RFC 3461 §6.2.7.3, RFC 3464 §2.3.3: the "expanded" notices the policy owed at RCPT
    (NOTIFY=SUCCESS for an alias of several addresses) name each alias as RCPT named it, with
    its ORCPT (and none without), once. A member carried the alias's name: only one alias
    could stand on it, and another alias of the same members got no notice."""
    runner, queue, boxes, _clock = make(tmp_path, {})
    member = Recipient("alice@a.test", original="team@a.test", notify=["FAILURE"])
    env = Envelope("Q1", "alice@a.test", [member], NOW)
    aliases: list[tuple[str, str | None]] = [
        ("Team@a.test", "rfc822;Team@a.test"),
        ("info@a.test", None),
    ]
    env.reports.append(PendingReport("R1", [], [], NOW, aliases))
    asyncio.run(accept(runner, env))
    assert not queue.messages
    assert boxes.delivered == [("Q1", "alice@a.test"), ("R1", "alice@a.test")]
    report = queue.accepted["R1"][1]
    assert report.count(b"\nAction: expanded\n") == 2 and report.count(b"\nAction: ") == 2
    assert b"\nFinal-Recipient: rfc822; Team@a.test\n" in report
    assert b"\nFinal-Recipient: rfc822; info@a.test\n" in report
    assert report.count(b"\nOriginal-Recipient: ") == 1
    assert b"\nOriginal-Recipient: rfc822; Team@a.test\n" in report
    assert b"<info@a.test>: expanded (2.0.0)\n" in report


def test_an_expanded_notice_stored_on_a_member_still_names_the_alias(tmp_path: Path) -> None:
    """The form stored before the alias had a field of its own: a member that carries it."""
    runner, queue, boxes, _clock = make(tmp_path, {})
    member = Recipient(
        "alice@a.test", original="team@a.test", orcpt="rfc822;team@a.test", notify=["FAILURE"]
    )
    env = Envelope("Q1", "alice@a.test", [member], NOW)
    env.reports.append(PendingReport("R1", [0], ["expanded"], NOW))
    asyncio.run(accept(runner, env))
    assert not queue.messages
    assert boxes.delivered == [("Q1", "alice@a.test"), ("R1", "alice@a.test")]
    report = queue.accepted["R1"][1]
    assert report.count(b"\nAction: ") == 1 and b"\nAction: expanded\n" in report
    assert b"\nFinal-Recipient: rfc822; team@a.test\n" in report
    assert b"\nOriginal-Recipient: rfc822; team@a.test\n" in report
    assert b"<team@a.test>: expanded (2.0.0)\n" in report


def test_an_expanded_notice_is_sent_when_the_first_attempt_starts(tmp_path: Path) -> None:
    # It depends on no delivery, but waited for the end of the first attempt: minutes when
    # a remote member's hosts are dead (and after a crash, for the first retry).
    runner, queue, boxes, _clock = make(tmp_path, {})
    tarpit = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            await tarpit.wait()
            raise AssertionError("not reached")

    use_remote(runner, Remote())
    env = envelope("Q1", "alice@a.test", "x@slow.test")
    env.reports.append(PendingReport("R1", [], [], NOW, [("team@a.test", None)]))

    async def main() -> None:
        draft = runner.queue.draft(env.id, env.sender)
        draft.write(b"Subject: t\r\n\r\nbody\r\n")
        assert isinstance(await runner.accept(env, draft), Accepted)
        for _ in range(50):
            if ("R1", "alice@a.test") in boxes.delivered:
                break
            await asyncio.sleep(0.001)
        assert ("R1", "alice@a.test") in boxes.delivered, "not sent while the hosts are tried"
        assert Envelope.from_json(queue.stored["Q1"][0]).reports == []
        for task in runner._inflight.values():
            task.cancel()
        await asyncio.gather(*runner._inflight.values(), return_exceptions=True)

    asyncio.run(main())


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.parametrize("crash_after", range(1, 14))
def test_a_crash_at_any_step_sends_the_expanded_notice_once(
    tmp_path: Path, crash_after: int, remote: bool
) -> None:
    """kill -9 after each stored step of a message that owes an "expanded" notice from its
    acceptance (all its members here; or one here, one that bounces): one notice."""
    routes: dict[str, Route | RouteFailure] = {"b.test": RouteFailure("5.1.2", "NXDOMAIN")}
    runner, queue, boxes, clock = make(tmp_path, routes if remote else {})
    queue.crash_after = crash_after
    env = envelope("Q1", "alice@a.test", *(["x@b.test"] if remote else []))
    env.reports.append(PendingReport("R1", [], [], NOW, [("team@a.test", None)]))
    queue = crash_then_run_on(runner, boxes, clock, env, step=600, rounds=40)
    assert not queue.messages and not queue.twice
    assert [qid for qid, _mailbox in boxes.delivered].count("R1") == 1, boxes.delivered


@pytest.mark.parametrize("crash_after", range(1, 6))
def test_a_crash_at_any_step_of_a_bounce_sends_exactly_one_dsn(
    tmp_path: Path, crash_after: int
) -> None:
    """kill -9 after each stored step of a bounce (the five calls of the test above); the
    next start finishes the work: one DSN, whatever the step. (The DSN used to be queued
    before the outcome was stored, and a crash between the two sent a second one.)"""
    runner, queue, boxes, clock = make(tmp_path, {})
    queue.crash_after = crash_after
    env = envelope("Q1", "bob@nowhere.test")
    queue = crash_then_run_on(runner, boxes, clock, env, step=60, rounds=20)
    assert not queue.messages and not queue.twice
    reports = [qid for qid, _mailbox in boxes.delivered if qid != "Q1"]
    assert len(reports) == 1, boxes.delivered


@pytest.mark.parametrize("crash_after", range(1, 10))
def test_a_crash_at_any_step_of_a_bounce_sent_before_the_slower_domain_ends(
    tmp_path: Path, crash_after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounce one domain owes goes out while another domain's host is still at work
    (stored, queued and started in the middle of the attempt); kill -9 after each stored
    step: one DSN, and the refused recipient is not tried again."""
    monkeypatch.setattr(runner_mod, "BOUNCE_TOGETHER", 0.0)  # slow.test is slower than it
    runner, queue, boxes, clock = make(tmp_path, {})
    queue.crash_after = crash_after
    tried: list[str] = []

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *_a: Any, **_k: Any) -> list[Any]:
            tried.extend(r.address for r in outgoing.recipients)
            if domain == "fast.test":
                no = Reply(550, "5.1.1", ("no such user",))
                return [DeliveryResult(r, Outcome.PERMANENT, no, "mx") for r in outgoing.recipients]
            await asyncio.sleep(0.01)
            return delivered(outgoing)

    env = envelope("Q1", "nobody@fast.test", "carol@slow.test")
    queue = crash_then_run_on(runner, boxes, clock, env, step=600, rounds=20, remote=Remote())
    assert not queue.messages and not queue.twice
    assert len([qid for qid, _mailbox in boxes.delivered if qid != "Q1"]) == 1, boxes.delivered
    assert tried.count("nobody@fast.test") <= (1 if crash_after > 2 else 2), tried


def test_domains_that_fail_together_share_one_bounce_which_a_slow_domain_does_not_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A null MX and a domain that does not exist, both decided by DNS at once: one bounce
    # each, as the first domain done sent its own while the other was pending.
    monkeypatch.setattr(runner_mod, "BOUNCE_TOGETHER", 0.5)
    runner, queue, boxes, _clock = make(tmp_path, {})
    tarpit = asyncio.Event()
    failures = {
        "null.test": Reply(556, "5.1.10", ("null MX",)),
        "none.test": Reply(550, "5.1.2", ("NXDOMAIN",)),
        "later.test": Reply(550, "5.1.1", ("no such user",)),
    }

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *_a: Any, **_k: Any) -> list[Any]:
            if domain == "later.test":  # refused a moment after the DNS failures
                await asyncio.sleep(0.01)
            if domain in failures:
                no = failures[domain]
                return [DeliveryResult(r, Outcome.PERMANENT, no, None) for r in outgoing.recipients]
            await tarpit.wait()  # slow.test: a host that takes minutes
            return delivered(outgoing)

    use_remote(runner, Remote())
    env = envelope("Q1", "u@null.test", "u@none.test", "u@later.test", "u@slow.test")

    def reports() -> list[str]:
        return [qid for qid, _mailbox in boxes.delivered if qid != "Q1"]

    async def main() -> None:
        draft = runner.queue.draft(env.id, env.sender)
        draft.write(b"Subject: t\r\n\r\nbody\r\n")
        started = time.monotonic()
        assert isinstance(await runner.accept(env, draft), Accepted)
        while not reports() and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 2, "the bounce waited for the slow domain"
        tarpit.set()
        await settle(runner)

    asyncio.run(main())
    (dsn_id,) = reports()
    report = queue.accepted[dsn_id][1]
    for domain in ("null.test", "none.test", "later.test"):
        assert f"Final-Recipient: rfc822; u@{domain}".encode() in report
    assert b"u@slow.test" not in report
    assert [r.status for r in env.recipients] == ["bounced"] * 3 + ["delivered"]


def test_the_last_attempt_at_max_queue_time_bounces_with_the_last_error(tmp_path: Path) -> None:
    runner, queue, _boxes, clock = make(tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL")})
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))
    clock.now = NOW + 86400

    async def last() -> None:
        runner._start(env)
        await asyncio.gather(*runner._inflight.values())

    asyncio.run(last())
    assert env.recipients[0].status == "bounced" and "SERVFAIL" in (
        env.recipients[0].last_error or ""
    )
    assert ("finish", "Q1") in queue.calls


def test_a_local_copy_that_fails_is_retried_alone(tmp_path: Path) -> None:
    runner, queue, boxes, clock = make(tmp_path, {})
    queue.failing_copies.add("alice@a.test")
    env = envelope("Q1", "alice@a.test", sender="")
    asyncio.run(accept(runner, env))
    assert env.recipients[0].status == "deferred" and "local delivery failed" in (
        env.recipients[0].last_error or ""
    )
    assert env.attempts == 1 and queue.calls[-1] == ("record", "Q1")
    queue.failing_copies.clear()
    clock.now = env.next_attempt

    async def retry() -> None:
        runner._start(env)
        await asyncio.gather(*runner._inflight.values())

    asyncio.run(retry())
    assert boxes.delivered == [("Q1", "alice@a.test")]
    assert queue.calls[-1] == ("finish", "Q1")


def test_an_account_deleted_during_data_gets_no_copy_and_bounces(tmp_path: Path) -> None:
    # RCPT found gone@a.test; ``user del`` ran before the end of DATA (has_mailbox says so).
    runner, _queue, boxes, _clock = make(tmp_path, {})
    env = envelope("Q1", "gone@a.test", "alice@a.test")
    asyncio.run(accept(runner, env))
    assert [r.status for r in env.recipients] == ["bounced", "delivered"]
    assert "5.1.1" in (env.recipients[0].last_error or "")
    assert ("Q1", "gone@a.test") not in boxes.delivered
    assert ("Q1", "alice@a.test") in boxes.delivered


def test_a_message_whose_copies_are_all_made_at_acceptance_is_not_held(tmp_path: Path) -> None:
    runner, queue, _boxes, _clock = make(tmp_path, {})
    env = envelope("Q1", "alice@a.test")
    asyncio.run(accept(runner, env))
    assert queue.calls == [("accept", "Q1")] and env.attempts == 0


def test_a_success_notice_for_the_null_sender_holds_nothing(tmp_path: Path) -> None:
    # None is ever sent to <> (RFC 3461 §6.2): NOTIFY=SUCCESS kept all-local mail from it
    # queued for a first attempt that could only find nothing to do.
    runner, queue, _boxes, _clock = make(tmp_path, {})

    async def main() -> bool:
        await _put(runner, "Q1", "alice@a.test", notify=True, sender="")
        started = bool(runner._inflight)
        await settle(runner)
        return started

    assert not asyncio.run(main())
    assert queue.calls == [("accept", "Q1")]


def test_first_attempts_beyond_the_backlog_wait_in_the_queue(tmp_path: Path) -> None:
    runner, queue, _boxes, _clock = make(tmp_path, {})
    runner.services.cfg = config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(tmp_path),
            "delivery": {"max_concurrent": 1},
        }
    )
    gate = asyncio.Event()

    class SlowResolver(StaticResolver):
        async def route(self, domain: str) -> Route:
            await gate.wait()
            return await super().route(domain)

    runner._resolver = lambda _cfg: SlowResolver({})

    async def main() -> list[Envelope]:
        envs = [envelope(f"Q{i}", "bob@far.test") for i in range(10)]
        for env in envs:
            draft = runner.queue.draft(env.id, env.sender)
            draft.write(b"x\r\n")
            assert isinstance(await runner.accept(env, draft), Accepted)
        await asyncio.sleep(0.01)  # the ones over the backlog record themselves at once
        gate.set()
        await asyncio.gather(*runner._inflight.values())
        return envs

    envs = asyncio.run(main())
    waiting = [e for e in envs if e.attempts == 0]
    assert len(waiting) == 10 - 4  # beyond 4 x max_concurrent
    assert all(e.next_attempt == 0.0 and ("record", e.id) in queue.calls for e in waiting)
    assert all(e.recipients[0].status == "bounced" for e in envs if e.attempts)


@pytest.mark.parametrize(
    ("fast", "notify", "stored_early"),
    [
        ("ok", None, "delivered"),
        ("ok", ("SUCCESS",), "delivered"),  # stored with the success DSN it owes, sent now
        ("bounce", None, "delivered"),  # one delivered, one bounced: the bounce goes now
    ],
)
def test_a_domain_delivered_is_stored_before_a_slower_one_ends(
    tmp_path: Path, fast: str, notify: tuple[str, ...] | None, stored_early: str
) -> None:
    """A stop or crash while another domain's MX is still being waited on must not send the
    delivered copies again: they are stored as soon as their domain is done, with the DSNs
    they owe, which are queued then and there. (A probe: a 550 from one domain was bounced
    only when another domain's silent MX gave up, minutes later; a kill -9 meanwhile sent
    the refused RCPT again.)"""
    from postroom.delivery.remote import DeliveryResult
    from postroom.smtp.client_engine import Outcome, OutgoingMessage
    from postroom.wire.replies import Reply

    runner, queue, _boxes, _clock = make(tmp_path, {})
    slow_release = asyncio.Event()

    class Remote:
        async def deliver(
            self, domain: str, outgoing: OutgoingMessage, *_args: Any, **_kw: Any
        ) -> list[DeliveryResult]:
            if domain == "slow.test":
                await slow_release.wait()
            ok = Reply(250, "2.0.0", ("queued",))
            no = Reply(550, "5.1.1", ("no such user",))
            return [
                DeliveryResult(r, Outcome.PERMANENT, no, f"mx.{domain}")
                if r.address.startswith("nobody")
                else DeliveryResult(r, Outcome.DELIVERED, ok, f"mx.{domain}")
                for r in outgoing.recipients
            ]

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]

    async def main() -> None:
        rcpts = ["bob@fast.test"] + (["nobody@fast.test"] if fast == "bounce" else [])
        env = envelope("Q1", *rcpts, "carol@slow.test")
        env.recipients[0].notify = list(notify) if notify else None
        await hand_over(runner, env)
        for _ in range(50):  # until the fast domain is done (and stored, if it may be)
            await asyncio.sleep(0)
        stored = Envelope.from_json(queue.stored["Q1"][0])
        outcomes = {"bob@fast.test": stored_early, "nobody@fast.test": "bounced"}
        assert [(r.address, r.status) for r in stored.recipients] == [
            *((r, outcomes[r]) for r in rcpts),
            ("carol@slow.test", "queued"),
        ]
        assert stored.reports == []  # the DSN owed is queued (held: the record says so)
        dsns = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
        assert len(dsns) == (0 if fast == "ok" and not notify else 1)  # before the slow one
        slow_release.set()
        await settle(runner)
        assert "Q1" not in queue.messages  # every recipient done: finished
        dsns = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
        assert len(dsns) == (0 if fast == "ok" and not notify else 1)

    asyncio.run(main())


def test_an_attempt_that_fails_unexpectedly_is_counted_once(tmp_path: Path) -> None:
    """An error the attempt did not expect (a bug, a message it cannot handle) is retried
    later, counted once: it was counted before dialling and again by the error's handler."""
    runner, _queue, _boxes, clock = make(
        tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL for b.test")}
    )
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))
    assert env.attempts == 1

    async def boom(*_args: object) -> Any:
        raise RuntimeError("unexpected")

    runner._deliver_remote = boom  # type: ignore[method-assign]

    async def retry() -> None:
        clock.now = env.next_attempt
        runner._start(env)
        await asyncio.gather(*runner._inflight.values())

    asyncio.run(retry())
    assert env.attempts == 2 and env.next_attempt > clock.now


def test_an_attempt_that_fails_unexpectedly_at_every_try_still_expires(tmp_path: Path) -> None:
    """The expiry check came after the remote deliveries, so an error there at every try kept
    the message for ever: past max_queue_time it now bounces like any other."""
    runner, queue, boxes, clock = make(
        tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL for b.test")}
    )
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))

    async def boom(*_args: object) -> Any:
        raise RuntimeError("unexpected")

    runner._deliver_remote = boom  # type: ignore[method-assign]

    async def retry_at(when: float) -> None:
        clock.now = when
        runner._start(env)
        await settle(runner)

    asyncio.run(retry_at(env.next_attempt))
    assert "Q1" in queue.messages  # not yet expired: waits for the next try
    asyncio.run(retry_at(NOW + 86400 + 1))
    assert env.recipients[0].status == "bounced" and "Q1" not in queue.messages
    assert [mailbox for qid, mailbox in boxes.delivered if qid != "Q1"] == ["alice@a.test"]


def test_a_full_disk_in_an_attempt_logs_one_line_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that refuses an attempt's outcome is an expected, handled case (tried again
    later): one line per message, as the logs promise, not a traceback for each; a bug still
    gets its traceback."""
    runner, queue, _boxes, clock = make(
        tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL for b.test")}
    )
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))
    record = queue.record

    async def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    async def retry(runner: QueueRunner, env: Envelope) -> None:
        runner._start(env)
        await settle(runner)

    for error in (OSError(28, "No space left on device"), KeyError("a bug")):

        async def boom(*_args: object, error: BaseException = error) -> Any:
            raise error

        runner._deliver_remote = boom  # type: ignore[method-assign]
        queue.record = full  # type: ignore[method-assign]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test-runner"):
            clock.now = env.next_attempt
            asyncio.run(retry(runner, env))
        if isinstance(error, OSError):  # the domain's error, then the record's (twice)
            assert [r.levelname for r in caplog.records] == ["WARNING"] * 3
            assert all(r.exc_info is None for r in caplog.records)
            assert "No space left on device" in caplog.records[0].getMessage()
        else:
            assert caplog.records[0].exc_info is not None
        queue.record = record  # type: ignore[method-assign]


def test_a_reload_keeps_the_remote_delivery_that_runs_the_attempts(tmp_path: Path) -> None:
    """A reload made a new RemoteDelivery and dropped the old one: its cached sessions were
    never given QUIT (held open until the peer timed them out, RFC 5321 §4.1.1.10), and a
    stop set ``stopping`` on the new one only, not on the deliveries the old one ran."""
    runner, _queue, _boxes, _clock = make(tmp_path, {})
    first = runner._remote_delivery()
    new = config_mod.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": str(tmp_path)}
    )
    runner.services.cfg = new
    runner.reconfigured()  # what a reload calls: at once, not at the next delivery
    assert runner._remote is first and first.cfg is new


def test_a_store_that_is_away_is_told_apart_from_a_full_disk(tmp_path: Path) -> None:
    # A PostgreSQL outage was refused, logged and counted as a full disk: an alert on
    # postroom_disk_full_refusals_total fired, and pointed at the disk, at every outage.
    from postroom.errors import StorageUnavailable, TemporaryStorageError
    from postroom.events import refusal_reason
    from postroom.wire import replies

    runner, queue, _boxes, _clock = make(tmp_path, {})
    got = []
    for error in (StorageUnavailable("PostgreSQL: gone"), TemporaryStorageError("disk full")):

        async def refuse(*_args: object, error: Exception = error) -> list[OSError | None]:
            raise error

        queue.accept = refuse  # type: ignore[method-assign]
        env = envelope("Q1", "ann@a.test")
        draft = queue.draft(env.id, env.sender)
        got.append(asyncio.run(runner.accept(env, draft)))
    assert got == [replies.STORAGE_AWAY, replies.STORAGE_FULL]
    assert [refusal_reason(r) for r in got] == ["storage_unavailable", "disk_full"]  # type: ignore[arg-type]
    assert all(r.code == 452 for r in got)  # type: ignore[union-attr]


def test_an_error_in_one_domain_keeps_the_bounce_another_domain_owes(tmp_path: Path) -> None:
    # b.test refused bob for good; the c.test delivery then failed with an error of ours. The
    # attempt was settled as if nothing had happened: bob stored bounced, and no DSN ever.
    runner, _queue, boxes, _clock = make(tmp_path, {})
    deliver_remote = runner._deliver_remote

    async def c_fails(envelope: Envelope, domain: str, rcpts: Any, wire: bytes, kept: Any) -> Any:
        if domain == "c.test":
            await asyncio.sleep(0.05)
            raise RuntimeError("a bug in the c.test delivery")
        return await deliver_remote(envelope, domain, rcpts, wire, kept)

    runner._deliver_remote = c_fails  # type: ignore[method-assign]
    env = envelope("Q1", "bob@b.test", "carol@c.test")
    asyncio.run(accept(runner, env))
    assert [r.status for r in env.recipients] == ["bounced", "deferred"]
    assert [mailbox for qid, mailbox in boxes.delivered if qid != "Q1"] == ["alice@a.test"]


def test_a_message_whose_every_attempt_fails_still_expires(tmp_path: Path) -> None:
    # From its first attempt on: its recipient never got an outcome, stayed "queued", and
    # the expiry, which took only "deferred" ones, never came (still queued on day 100).
    runner, queue, _boxes, clock = make(tmp_path, {})

    async def boom(*_args: object) -> Any:
        raise RuntimeError("unexpected")

    async def unexpected_everywhere(runner: QueueRunner, env: Envelope) -> None:
        runner._deliver = boom  # type: ignore[method-assign]
        await accept(runner, env)

    env = envelope("Q1", "bob@b.test")
    asyncio.run(unexpected_everywhere(runner, env))
    # Deferred with the error as its last one: it stayed "queued" with none, so `queue list`
    # could not say why the mail waited, and no delivery line was logged (exhaust probe).
    (bob,) = env.recipients
    assert (bob.status, bob.last_error) == (
        "deferred",
        "451 4.3.0 local error in delivery: RuntimeError",
    )

    async def retry_at(when: float) -> None:
        clock.now = when
        runner._start(env)
        await settle(runner)

    asyncio.run(retry_at(NOW + 86400 + 1))
    assert env.recipients[0].status == "bounced" and "Q1" not in queue.messages


def test_a_domain_cut_short_keeps_what_the_others_did(tmp_path: Path) -> None:
    # b.test took bob (250) and refused nobody (550); c.test's dot was withheld by a stop.
    # The stop's LeaseLost dropped the whole attempt: bob stayed queued and got the message
    # again after the restart, and nobody's bounce was never sent.
    from postroom.delivery.remote import STOPPED, DeliveryResult, DotWithheld
    from postroom.smtp.client_engine import Outcome, OutgoingMessage
    from postroom.wire.replies import Reply

    runner, _queue, boxes, _clock = make(tmp_path, {})

    class Remote:
        async def deliver(
            self, domain: str, outgoing: OutgoingMessage, *_args: Any, **_kw: Any
        ) -> list[DeliveryResult]:
            if domain == "c.test":
                await asyncio.sleep(0.05)
                raise DotWithheld("mx.c.test[192.0.2.3]", STOPPED)
            ok = Reply(250, "2.0.0", ("queued",))
            no = Reply(550, "5.1.1", ("no such user",))
            return [
                DeliveryResult(r, Outcome.PERMANENT, no, "mx.b.test")
                if r.address.startswith("nobody")
                else DeliveryResult(r, Outcome.DELIVERED, ok, "mx.b.test")
                for r in outgoing.recipients
            ]

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    env = envelope("Q1", "bob@b.test", "nobody@b.test", "carol@c.test")
    asyncio.run(accept(runner, env))
    # carol's dot was held back: deferred, but the stop's words are no last error of hers
    assert [r.status for r in env.recipients] == ["delivered", "bounced", "deferred"]
    assert env.recipients[2].last_error is None
    assert [mailbox for qid, mailbox in boxes.delivered if qid != "Q1"] == ["alice@a.test"]


def delivery_lines(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The arguments of every ``events.delivery`` call from now on (each still logged)."""
    from postroom import events

    lines: list[dict[str, Any]] = []
    real = events.delivery

    def delivery(*args: Any, **kwargs: Any) -> None:
        lines.append(dict(inspect.signature(real).bind(*args, **kwargs).arguments))
        real(*args, **kwargs)

    monkeypatch.setattr(events, "delivery", delivery)
    return lines


def test_the_delivery_lines_name_the_tls_of_their_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line's tls is that of the session behind it: a result's, and for recipients cut
    short at a host (their dot withheld), that host's session; none at all (not "none", which
    says plaintext) where no host was reached. The cut-short lines said "none" before."""
    from postroom.delivery.remote import NOT_TRIED, STOPPED, DeliveryResult, DotWithheld
    from postroom.smtp.client_engine import Outcome, OutgoingMessage
    from postroom.wire.replies import Reply

    runner, _queue, _boxes, _clock = make(tmp_path, {})
    logged = delivery_lines(monkeypatch)

    class Remote(FakeRemote):
        async def deliver(
            self, domain: str, outgoing: OutgoingMessage, *_args: Any, **_kw: Any
        ) -> list[DeliveryResult]:
            if domain == "c.test":
                raise DotWithheld("mx.c.test[192.0.2.3]", STOPPED, "TLSv1.2 ECDHE-RSA-AES128")
            if domain == "d.test":
                raise DotWithheld("", NOT_TRIED)
            ok = Reply(250, "2.0.0", ("queued",))
            (rcpt,) = outgoing.recipients
            tls = "TLSv1.3 TLS_AES_256_GCM_SHA384"
            return [
                DeliveryResult(rcpt, Outcome.DELIVERED, ok, "mx.b.test", False, "192.0.2.2", tls)
            ]

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    env = envelope("Q1", "bob@b.test", "carol@c.test", "dave@d.test")
    asyncio.run(accept(runner, env))
    lines = {line["rcpt"].address: (line["relay"], line.get("tls")) for line in logged}
    assert lines["bob@b.test"] == ("mx.b.test[192.0.2.2]:25", "TLSv1.3 TLS_AES_256_GCM_SHA384")
    assert lines["carol@c.test"] == ("mx.c.test[192.0.2.3]:25", "TLSv1.2 ECDHE-RSA-AES128")
    assert lines["dave@d.test"] == ("none", None)


@pytest.mark.parametrize("held", ["carol@slow.test", "carol@fast.test"])
def test_a_stop_that_cancels_an_attempt_keeps_the_250s_it_holds(tmp_path: Path, held: str) -> None:
    """A stop cancelled the attempt while a host held it (another domain's MX, or the backup
    MX of bob's domain for carol) and dropped bob's 250, held in memory since a DSN is owed
    for it (NOTIFY=SUCCESS): the restart sent bob the message again. Now it is stored with
    that DSN, owed, due at once (or, held by another domain, with the DSN queued as bob's
    domain was done): one copy to bob, one DSN."""
    from postroom.delivery.remote import DeliveryResult
    from postroom.smtp.client_engine import Outcome, OutgoingMessage
    from postroom.wire.replies import Reply

    runner, queue, boxes, clock = make(tmp_path, {})
    hold = asyncio.Event()
    sent: list[str] = []

    class Remote(FakeRemote):
        async def deliver(
            self,
            domain: str,
            outgoing: OutgoingMessage,
            wire: bytes,
            may_finish: Any,
            final: dict[int, DeliveryResult] | None = None,
            queue_id: str = "",
            marked_since: float | None = None,
        ) -> list[DeliveryResult]:
            ok = Reply(250, "2.0.0", ("queued",))
            final = {} if final is None else final  # (a host's 250 goes in as it comes)
            out = []
            for i, r in enumerate(outgoing.recipients):
                if r.address == held:
                    await hold.wait()  # the tarpit (until the restart)
                sent.append(r.address)
                out.append(final.setdefault(i, DeliveryResult(r, Outcome.DELIVERED, ok, "mx")))
            return out

    async def first_run() -> None:
        use_remote(runner, Remote())
        env = envelope("Q1", "bob@fast.test", held)
        env.recipients[0].notify = ["SUCCESS"]
        await hand_over(runner, env)
        for _ in range(50):
            await asyncio.sleep(0)
        assert sent == ["bob@fast.test"]
        await runner.stop(timeout=0.01)
        left.extend(runner._inflight)

    left: list[str] = []
    asyncio.run(first_run())
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert [r.status for r in stored.recipients] == ["delivered", "deferred"]
    # (The other domain's tarpit: the notice went as bob's domain was done, not stored owed.)
    assert len(stored.reports) == (0 if held.endswith("slow.test") else 1)
    assert stored.next_attempt <= clock.now
    # (and in the history queue show lists: the cut attempt was missing from it)
    assert [a.recipients for a in stored.history] == [["bob@fast.test"]]
    assert not left  # the stop waited for it to store that

    queue = boxes.queue = queue.restarted()
    runner = QueueRunner(
        runner.services, queue, boxes, runner._resolver, clock=clock, jitter=lambda: 0.0
    )
    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    hold = asyncio.Event()  # (the first run's is bound to its loop)

    async def restart() -> None:
        for due in await queue.claim(clock.now, 100):
            runner._start(due)
        # The notice owed goes while the host still holds the new attempt (it held every
        # attempt until the next stop, and the notice was never sent).
        for _ in range(200):
            await asyncio.sleep(0)
        assert [qid for qid, _mailbox in boxes.delivered if qid != "Q1"], "no DSN yet"
        hold.set()
        await settle(runner)

    asyncio.run(restart())
    assert sent == ["bob@fast.test", held], "bob got the message again"
    assert not queue.messages and not queue.twice
    assert len([qid for qid, _mailbox in boxes.delivered if qid != "Q1"]) == 1  # the DSN


class _SecondAttempt(FakeRemote):
    """A remote side whose first attempt is greylisted by mx.b.test and whose second one
    ends as ``second`` says: a dot the stop withholds, or an error of ours."""

    def __init__(self, second: BaseException) -> None:
        self.second = second
        self.calls = 0

    async def deliver(
        self,
        domain: str,
        outgoing: Any,
        wire: bytes,
        may_finish: Any,
        final: Any = None,
        queue_id: str = "",
        marked_since: float | None = None,
    ) -> list[Any]:
        from postroom.delivery.remote import DeliveryResult
        from postroom.smtp.client_engine import Outcome
        from postroom.wire.replies import Reply

        self.calls += 1
        if self.calls > 1:
            raise self.second
        grey = Reply(451, "4.7.1", ("greylisted",))
        return [
            DeliveryResult(
                r, Outcome.TEMPORARY, grey, "mx.b.test", ip="192.0.2.2", host="mx.b.test"
            )
            for r in outgoing.recipients
        ]


def _last_attempt(tmp_path: Path, second: BaseException) -> tuple[Envelope, Any, Any]:
    """Q1 to bob@b.test greylisted once, then its last attempt past max_queue_time."""
    runner, queue, boxes, clock = make(tmp_path, {})
    use_remote(runner, _SecondAttempt(second))
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))
    clock.now = NOW + 86400 + 10

    async def last() -> None:
        runner._start(env)
        await settle(runner)

    asyncio.run(last())
    return env, queue, boxes


def test_a_dot_the_stop_withholds_is_no_outcome_and_does_not_expire_the_message(
    tmp_path: Path,
) -> None:
    # Past max_queue_time, the stop withheld the final dot of a host about to take the
    # message: the stop itself bounced it, "the server is stopping" as the host's words.
    from postroom.delivery.remote import STOPPED, DotWithheld

    env, queue, boxes = _last_attempt(tmp_path, DotWithheld("mx.b.test[192.0.2.2]", STOPPED))
    bob = env.recipients[0]
    assert bob.status == "deferred" and bob.last_error is not None
    assert "greylisted" in bob.last_error
    assert "Q1" in queue.messages
    assert [qid for qid, _mailbox in boxes.delivered if qid != "Q1"] == []


def test_an_error_of_ours_is_not_put_in_an_earlier_host_s_mouth(tmp_path: Path) -> None:
    # The bounce said "host mx.b.test said: 451 4.3.0 local error in delivery", with a
    # Remote-MTA: the host of the earlier attempt stayed on the recipient.
    env, queue, boxes = _last_attempt(tmp_path, KeyError("a bug of ours"))
    bob = env.recipients[0]
    assert bob.status == "bounced" and bob.remote_mta is None
    (dsn,) = [qid for qid, _mailbox in boxes.delivered if qid != "Q1"]
    text = queue.accepted[dsn][1].decode()
    assert "Remote-MTA" not in text and "mx.b.test said" not in text
    assert "Diagnostic-Code: X-Postroom; local error in delivery: KeyError" in text


def test_mail_accepted_while_the_stop_waits_gets_its_first_attempt_but_dials_no_host(
    tmp_path: Path,
) -> None:
    # The stop holds final dots back from its first moment, and first refused to start any
    # attempt: a message whose DATA ended then was stored, but its local copy's success
    # notice (NOTIFY=SUCCESS) was never owed, and its remote recipients waited a retry
    # interval after the restart instead of going at once.
    runner, queue, boxes, clock = make(tmp_path, {})
    dialled: list[str] = []

    class Remote(FakeRemote):
        async def deliver(self, domain: str, *args: Any, **kwargs: Any) -> list[Any]:
            dialled.append(domain)
            raise AssertionError("no host is dialled once the stop has begun")

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    env = envelope("Q1", "alice@a.test", "bob@b.test")
    env.recipients[0].notify = ["SUCCESS"]

    async def first_run() -> None:
        runner.begin_stop()  # SIGTERM: the session in DATA finishes its message
        await hand_over(runner, env)
        await settle(runner)
        await runner.stop(timeout=1)

    asyncio.run(first_run())
    assert dialled == []
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert [r.status for r in stored.recipients] == ["delivered", "queued"]
    assert stored.next_attempt <= clock.now  # due at once at the next start
    assert stored.attempts == 0  # no host saw one
    owed = [qid for qid in queue.stored if qid != "Q1"] + [
        qid for qid, _mailbox in boxes.delivered if qid != "Q1"
    ]
    assert owed, "the success notice was never owed"


def test_a_cancel_after_a_withheld_dot_keeps_the_250_an_earlier_host_gave(
    tmp_path: Path,
) -> None:
    # The stop's cancel reached the attempt after a domain's dot was withheld (its first MX
    # took d1) but before the attempt read that domain's result: the domain counted as
    # ended, so its 250 was never stored, and the restart sent d1 the message again.
    from postroom.delivery.remote import STOPPED, DeliveryResult, DotWithheld
    from postroom.smtp.client_engine import Outcome
    from postroom.wire.replies import Reply

    runner, queue, _boxes, _clock = make(tmp_path, {})

    class Remote(FakeRemote):
        async def deliver(
            self,
            domain: str,
            outgoing: Any,
            wire: bytes,
            may_finish: Any,
            final: Any,
            queue_id: str = "",
            marked_since: float | None = None,
        ) -> list[DeliveryResult]:
            await asyncio.sleep(0.01)
            ok = Reply(250, "2.0.0", ("queued",))
            final[0] = DeliveryResult(outgoing.recipients[0], Outcome.DELIVERED, ok, "mx1.d.test")
            runner._inflight["Q1"].cancel()  # the stop's time-out, at this very moment
            raise DotWithheld("mx2.d.test[192.0.2.9]", STOPPED)

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    env = envelope("Q1", "d1@d.test", "d2@d.test")

    async def main() -> None:
        await hand_over(runner, env)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*runner._inflight.values())

    asyncio.run(main())
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert [r.status for r in stored.recipients] == ["delivered", "deferred"]


def test_a_cancel_during_an_early_save_still_keeps_what_the_attempt_holds(
    tmp_path: Path,
) -> None:
    # The stop's cancel landed while the attempt stored fast.test's 250 early (a slow disk,
    # a database round trip): it was not caught there, and slow.test's 250 from its first
    # MX host (s1), held while its backup host was tried, was never stored.
    from postroom.delivery.remote import DeliveryResult
    from postroom.smtp.client_engine import Outcome
    from postroom.wire.replies import Reply

    runner, queue, _boxes, _clock = make(tmp_path, {})
    save = queue.save

    async def slow_save(env: Envelope) -> None:
        await asyncio.sleep(0.1)
        await save(env)

    queue.save = slow_save  # type: ignore[method-assign]
    tarpit = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(
            self,
            domain: str,
            outgoing: Any,
            wire: bytes,
            may_finish: Any,
            final: Any,
            queue_id: str = "",
            marked_since: float | None = None,
        ) -> list[DeliveryResult]:
            ok = Reply(250, "2.0.0", ("queued",))
            if domain == "fast.test":
                return [DeliveryResult(outgoing.recipients[0], Outcome.DELIVERED, ok, "mx")]
            await asyncio.sleep(0.02)
            final[0] = DeliveryResult(outgoing.recipients[0], Outcome.DELIVERED, ok, "mx1")
            await tarpit.wait()
            raise AssertionError("never")

    use_remote(runner, Remote())
    env = envelope("Q1", "f@fast.test", "s1@slow.test", "s2@slow.test")

    async def main() -> None:
        await hand_over(runner, env)
        await asyncio.sleep(0.05)  # fast.test's early save under way; s1 has its 250
        await runner.stop(timeout=0.0)

    asyncio.run(main())
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert [r.status for r in stored.recipients] == ["delivered", "delivered", "deferred"]


def test_a_dot_the_fence_withholds_keeps_the_retry_schedule(tmp_path: Path) -> None:
    # A held-back dot made the message due at once, the fence's refusal (the lease not
    # confirmed) too: on a shared queue the node claimed it again at once, a hot loop
    # sending the whole message without its dot hundreds of times a second.
    from postroom.delivery.remote import FENCED, DotWithheld

    env, queue, _boxes = _last_attempt(tmp_path, DotWithheld("mx.b.test[192.0.2.2]", FENCED))
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert stored.next_attempt > NOW + 86400 + 10  # a retry interval away, not at once
    assert env.recipients[0].status == "deferred"  # and no bounce by it


@pytest.mark.parametrize("why", ["the stop", "an overload"])
def test_a_first_attempt_that_never_runs_still_owes_its_success_notice(
    tmp_path: Path, why: str
) -> None:
    # A local copy's NOTIFY=SUCCESS notice was decided in the first attempt only: a first
    # attempt cancelled by the stop while it waited for a slot, or parked by an overload,
    # never owed it, and the sender never heard (the message then finished, silent). (Its
    # hosts now wait for slots after the notice is decided and sent.)

    runner, queue, _boxes, clock = make(tmp_path, {})
    runner._slots = asyncio.Semaphore(1)
    tarpit = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            if domain == "slow.test":
                await tarpit.wait()
            return delivered(outgoing, dsn_offered=True)

    use_remote(runner, Remote())

    async def first_run() -> None:
        await _put(runner, "Q0", "x@slow.test")  # holds the only slot
        if why == "an overload":
            for i in range(1, 4):  # BACKLOG first attempts: the next is parked
                await _put(runner, f"Q0{i}", f"x{i}@slow.test")
        await asyncio.sleep(0.01)
        if why == "the stop":
            runner.begin_stop()
        await _put(runner, "Q1", "alice@a.test", "bob@b.test", notify=True)
        await asyncio.sleep(0.01)
        await runner.stop(timeout=0.05)

    asyncio.run(first_run())
    stored = Envelope.from_json(queue.stored["Q1"][0])
    # Owed, or (its local copy done before any slot is waited for) queued already.
    notices = [q for kind, q in queue.calls if kind == "accept" and not q.startswith("Q")]
    assert len(stored.reports) + len(notices) == 1, "the success notice is not owed"
    # (a re-probe: the wait for slots the stop cut counted an attempt that dialled nothing)
    assert stored.next_attempt <= clock.now and stored.attempts == 0


def test_the_stop_waits_for_a_reply_to_a_final_dot_only_while_one_is_out(
    tmp_path: Path,
) -> None:
    # With one dot out and another delivery held by a tarpit, the stop waited the whole
    # commit time-out (until the tarpit's, which never ends), long after the reply came.
    runner, _queue, _boxes, _clock = make(tmp_path, {})
    tarpit = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:

            if domain == "slow.test":
                await tarpit.wait()
            self.committing += 1  # the dot is out: its reply comes in 0.3 s
            try:
                await asyncio.sleep(0.3)
            finally:
                self.committing -= 1
            return delivered(outgoing)

    use_remote(runner, Remote())

    async def main() -> float:
        for qid, rcpt in (("Q1", "x@slow.test"), ("Q2", "y@fast.test")):
            env = envelope(qid, rcpt)
            await hand_over(runner, env)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await runner.stop(timeout=0.0, commit_timeout=5.0)
        return time.monotonic() - started

    took = asyncio.run(main())
    assert took < 2.0, took


def _put(
    runner: QueueRunner, qid: str, *rcpts: str, notify: bool = False, sender: str = "alice@a.test"
) -> Any:
    async def put() -> Envelope:
        env = envelope(qid, *rcpts, sender=sender)
        if notify:
            env.recipients[0].notify = ["SUCCESS"]
        await hand_over(runner, env)
        return env

    return put()


def test_a_first_attempt_that_fails_still_owes_its_success_notice(tmp_path: Path) -> None:
    # A first attempt that raised (its body unreadable for a moment) ended without deciding
    # the notice its local copy owed (NOTIFY=SUCCESS), and no later attempt decides it.

    runner, queue, boxes, clock = make(tmp_path, {})

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            return delivered(outgoing, dsn_offered=True)

    use_remote(runner, Remote())
    body = queue.body
    failed: list[int] = []

    async def flaky(env: Envelope) -> bytes:
        if not failed:
            failed.append(1)
            raise OSError(errno.EIO, "Input/output error")
        return await body(env)

    queue.body = flaky  # type: ignore[method-assign]

    async def main() -> None:
        await _put(runner, "Q1", "alice@a.test", "bob@b.test", notify=True)
        await settle(runner)
        clock.now += 400
        for env in await queue.claim(clock.now, 100):
            runner._start(env)
        await settle(runner)

    asyncio.run(main())
    assert [qid for qid, _mailbox in boxes.delivered if qid != "Q1"], "no success notice"


def test_a_notice_made_while_the_stop_waits_is_due_at_once(tmp_path: Path) -> None:
    # A bounce decided while stop() waited for the attempts in flight was queued, its first
    # attempt refused, and stored due a retry interval (5 minutes) after the restart.
    from postroom.delivery.remote import DeliveryResult
    from postroom.smtp.client_engine import Outcome
    from postroom.wire.replies import Reply

    runner, queue, _boxes, clock = make(tmp_path, {})
    gate = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            await gate.wait()
            no = Reply(550, "5.1.1", ("no such user",))
            return [
                DeliveryResult(r, Outcome.PERMANENT, no, "mx.b.test") for r in outgoing.recipients
            ]

    use_remote(runner, Remote())

    async def main() -> None:
        await _put(runner, "Q1", "bob@b.test", sender="carol@remote.test")
        await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_later(0.05, gate.set)
        await runner.stop(timeout=1.0)

    asyncio.run(main())
    (dsn,) = [qid for qid in queue.stored if qid != "Q1"]
    assert Envelope.from_json(queue.stored[dsn][0]).next_attempt <= clock.now


def test_a_stop_before_a_backup_host_keeps_what_the_first_host_said(tmp_path: Path) -> None:
    # The stop came while mx1 answered (r1 250, r2 451): r2 was logged deferred with our
    # "not finished before the final dot" at the never dialled mx2, mx1's real 451 dropped
    # (not logged, not in the history) and an older error left as r2's last error.
    from postroom.resolver import Target
    from postroom.smtp.client_engine import MessageDone, Outcome, RecipientResult
    from postroom.wire.replies import Reply

    routes = {
        "d.test": Route(
            (Target("mx1.d.test", ("192.0.2.1",), 10), Target("mx2.d.test", ("192.0.2.2",), 20))
        )
    }
    runner, queue, _boxes, _clock = make(tmp_path, routes)
    dialled: list[str] = []
    remote = runner._remote_delivery()

    async def at(target: Any, ip: str, message: Any, *args: Any, **kw: Any) -> Any:
        dialled.append(target.host)
        ok, grey = Reply(250, "2.0.0", ("queued",)), Reply(451, "4.7.1", ("greylisted",))
        results = tuple(
            RecipientResult(r, Outcome.DELIVERED, ok)
            if r.address.startswith("r1")
            else RecipientResult(r, Outcome.TEMPORARY, grey)
            for r in message.recipients
        )
        runner.begin_stop()  # SIGTERM, while mx1's transaction ends
        return MessageDone(results, True), False

    remote._deliver_at = at  # type: ignore[method-assign]
    env = envelope("Q1", "r1@d.test", "r2@d.test")
    env.attempts, env.next_attempt = 1, NOW
    env.recipients[1].last_error = "421 4.4.2 an older error"
    queue.messages["Q1"] = (env, b"Return-Path: <alice@a.test>\nSubject: t\n\nbody\n")

    async def main() -> None:
        runner._start(env)
        await settle(runner)

    asyncio.run(main())
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert dialled == ["mx1.d.test"]
    assert [(r.status, r.last_error) for r in stored.recipients] == [
        ("delivered", None),
        ("deferred", "451 4.7.1 greylisted"),
    ]
    assert [a.host for a in stored.history] == ["mx1.d.test", "mx1.d.test"]


def test_a_retry_that_gets_its_slot_while_the_stop_drains_counts_no_attempt(
    tmp_path: Path,
) -> None:
    # Waiting for a slot when the stop began, it got one, dialled nothing, and still counted
    # an attempt (its next real failure then waited a longer interval).

    runner, queue, _boxes, _clock = make(tmp_path, {})
    runner._slots = asyncio.Semaphore(1)
    gate = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *args: Any, **kw: Any) -> list[Any]:
            await gate.wait()
            return delivered(outgoing)

    use_remote(runner, Remote())
    env = envelope("R", "bob@b.test")
    env.attempts, env.next_attempt = 1, NOW
    queue.messages["R"] = (env, b"Return-Path: <alice@a.test>\nSubject: t\n\nbody\n")

    async def main() -> None:
        await _put(runner, "H", "x@hold.test")  # holds the only slot
        await asyncio.sleep(0.01)
        runner._start(env)  # claimed: waits for the slot
        await asyncio.sleep(0.01)
        runner.begin_stop()
        gate.set()
        await runner.stop(timeout=1.0)

    asyncio.run(main())
    assert Envelope.from_json(queue.stored["R"][0]).attempts == 1


def test_a_stop_before_a_backup_host_keeps_the_first_host_s_refusal(tmp_path: Path) -> None:
    # mx1 refused the session (a 421 greeting), then the stop came before mx2: the recipient
    # was logged "not tried" and kept an older error as its last.
    from postroom.delivery.remote import _SessionFailed
    from postroom.resolver import Target
    from postroom.wire.replies import Reply

    routes = {
        "d.test": Route(
            (Target("mx1.d.test", ("192.0.2.1",), 10), Target("mx2.d.test", ("192.0.2.2",), 20))
        )
    }
    runner, queue, _boxes, _clock = make(tmp_path, routes)
    remote = runner._remote_delivery()

    async def at(*args: Any, **kw: Any) -> Any:
        runner.begin_stop()
        raise _SessionFailed(Reply(421, "4.3.2", ("mx1.d.test[192.0.2.1]: 421 too busy",)))

    remote._deliver_at = at  # type: ignore[method-assign]
    env = envelope("Q1", "r2@d.test")
    env.attempts, env.next_attempt = 1, NOW
    env.recipients[0].status, env.recipients[0].last_error = "deferred", "451 4.7.1 older"
    queue.messages["Q1"] = (env, b"Return-Path: <alice@a.test>\nSubject: t\n\nbody\n")

    async def main() -> None:
        runner._start(env)
        await settle(runner)

    asyncio.run(main())
    (r2,) = Envelope.from_json(queue.stored["Q1"][0]).recipients
    assert r2.status == "deferred" and r2.last_error is not None
    assert "421 too busy" in r2.last_error


def test_a_literal_domain_is_named_by_its_address_in_the_delivery_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mail to user@[IPv6:2001:db8::2] names the host as Postfix does, by its address
    ("2001:db8::2[2001:db8::2]:25"); the line said "[IPv6:2001:db8::2][2001:db8::2]:25"."""
    from postroom.delivery.remote import DeliveryResult
    from postroom.smtp.client_engine import Outcome, OutgoingMessage
    from postroom.wire.replies import Reply

    runner, _queue, _boxes, _clock = make(tmp_path, {})
    logged = delivery_lines(monkeypatch)

    class Remote(FakeRemote):
        async def deliver(
            self, domain: str, outgoing: OutgoingMessage, *_args: Any, **_kw: Any
        ) -> list[DeliveryResult]:
            ok = Reply(250, "2.0.0", ("queued",))
            return [
                DeliveryResult(r, Outcome.DELIVERED, ok, domain, False, "2001:db8::2", host=domain)
                for r in outgoing.recipients
            ]

    runner._remote_delivery = lambda: Remote()  # type: ignore[method-assign]
    asyncio.run(accept(runner, envelope("Q1", "bob@[IPv6:2001:db8::2]")))
    assert [line["relay"] for line in logged] == ["2001:db8::2[2001:db8::2]:25"]


@pytest.mark.parametrize("ending", ["a stop", "a 451"])
def test_a_message_deleted_during_an_attempt_is_not_said_to_be_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ending: str,
) -> None:
    """A probe and a re-probe: ``queue delete`` while a host held the attempt, which then
    ended by a stop (logged "cut short, tried again at the next start", and deferred) or by
    the host's 451 (a "deferred" line and count): it is (rightly) never tried again."""
    runner, queue, _boxes, _clock = make(tmp_path, {})
    lines = delivery_lines(monkeypatch)
    hang = asyncio.Event()

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *_a: Any, **_k: Any) -> list[Any]:
            await hang.wait()
            busy = Reply(451, "4.3.2", ("busy",))
            return [DeliveryResult(r, Outcome.TEMPORARY, busy, "mx") for r in outgoing.recipients]

    use_remote(runner, Remote())

    async def main() -> None:
        await hand_over(runner, envelope("Q1", "bob@slow.test"))
        await asyncio.sleep(0.01)
        assert await runner.delete("Q1")
        if ending == "a stop":
            await runner.stop(timeout=0.01)
        else:
            hang.set()
            await settle(runner)

    with caplog.at_level(logging.INFO, logger="test-runner"):
        asyncio.run(main())
    assert "cut short" not in caplog.text
    assert lines == []  # no "deferred" line for it either
    assert "Q1" not in queue.messages


def test_a_stalled_destination_holds_no_delivery_slot_from_the_others(tmp_path: Path) -> None:
    """A probe: four messages to a host that stalls (max_per_destination 2) held all four
    delivery slots (max_concurrent 4), two of them only waiting for that destination, and
    mail for any other domain waited behind them (at the defaults, for half an hour). Each
    domain of an attempt now takes its destination's slot before a delivery slot."""
    runner, queue, boxes, clock = make(tmp_path, {})
    runner.services.cfg = config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(tmp_path),
            "delivery": {"max_concurrent": 4, "max_per_destination": 2},
        }
    )
    runner = QueueRunner(
        runner.services, queue, boxes, runner._resolver, clock=clock, jitter=lambda: 0.0
    )
    stall = asyncio.Event()
    dialled: list[str] = []

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *_a: Any, **_k: Any) -> list[Any]:
            dialled.append(domain)
            if domain == "stalled.test":
                await stall.wait()
            return delivered(outgoing)

    use_remote(runner, Remote())

    async def main() -> None:
        for i in range(6):
            env = envelope(f"S{i}", f"u{i}@stalled.test")
            await hand_over(runner, env)
        both = envelope("M1", "m@stalled.test", "m@other.test")  # other.test goes at once
        draft = runner.queue.draft(both.id, both.sender)
        draft.write(b"Subject: t\r\n\r\nbody\r\n")
        await runner.accept(both, draft)
        healthy = envelope("H1", "h@healthy.test")
        draft = runner.queue.draft(healthy.id, healthy.sender)
        draft.write(b"Subject: t\r\n\r\nbody\r\n")
        await runner.accept(healthy, draft)
        for _ in range(100):
            await asyncio.sleep(0)
        assert dialled.count("stalled.test") == 2 and "healthy.test" in dialled
        assert "H1" not in queue.messages  # delivered and finished
        # (a re-probe: M1 held other.test's slot while it waited for stalled.test's, and
        # other.test's mail waited behind it; each domain takes its own slot now)
        assert "other.test" in dialled
        stall.set()
        await settle(runner)
        assert sorted(dialled) == ["healthy.test", "other.test", *["stalled.test"] * 7]
        assert not queue.messages

    asyncio.run(main())


def test_what_the_local_copies_owe_goes_before_a_slow_domain_and_is_due_if_cut(
    tmp_path: Path,
) -> None:
    """A re-probe: a local recipient's success notice (and a bounce for an account deleted
    since RCPT) waited for the slowest remote domain, and a kill -9 meanwhile lost it; and
    an early save that owed notices was stored due at the next retry only."""
    runner, queue, _boxes, clock = make(tmp_path, {})
    hang = asyncio.Event()
    stored: list[Envelope] = []
    save = queue.save

    async def saving(env: Envelope) -> None:
        await save(env)
        stored.append(Envelope.from_json(queue.stored[env.id][0]))

    queue.save = saving  # type: ignore[method-assign]

    class Remote(FakeRemote):
        async def deliver(self, domain: str, outgoing: Any, *_a: Any, **_k: Any) -> list[Any]:
            await hang.wait()
            return delivered(outgoing)

    use_remote(runner, Remote())

    async def main() -> None:
        env = envelope("Q1", "alice@a.test", "carol@slow.test")
        env.recipients[0].notify = ["SUCCESS"]
        await hand_over(runner, env)
        for _ in range(100):
            await asyncio.sleep(0)
        notices = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
        assert len(notices) == 1  # while carol's host still holds the attempt
        first_save = stored[0]
        assert first_save.reports and first_save.next_attempt <= clock.now  # due if cut here
        hang.set()
        await settle(runner)
        assert [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"] == notices

    asyncio.run(main())


def test_a_destination_slot_the_database_cannot_give_defers_the_domain(tmp_path: Path) -> None:
    """A re-probe: a PostgreSQL outage while attempts waited for their destinations' slots
    (taken outside the attempt's error handling then) killed those attempts unrecorded, and
    their node renewed their leases for as long as it ran: never tried again."""
    from postroom.errors import StorageUnavailable

    runner, queue, _boxes, _clock = make(tmp_path, {})

    class Away:
        @contextlib.asynccontextmanager
        async def slot(self, destination: str, limit: int) -> Any:
            raise StorageUnavailable("PostgreSQL: connection refused")
            yield

    runner._destinations = Away()  # type: ignore[assignment]
    use_remote(runner, FakeRemote())
    env = envelope("Q1", "bob@b.test", "alice@a.test")
    asyncio.run(accept(runner, env))
    assert [r.status for r in env.recipients] == ["deferred", "delivered"]
    stored = Envelope.from_json(queue.stored["Q1"][0])
    assert stored.recipients[0].status == "deferred" and stored.next_attempt > NOW


def test_an_error_in_claiming_due_messages_is_logged_and_the_schedule_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file the queue could not read ended the runner's task in silence: nothing was
    tried again, expired or bounced until the next restart."""
    runner, queue, _boxes, _clock = make(tmp_path, {})
    claims: list[float] = []
    real_claim = queue.claim

    async def claim(now: float, limit: int) -> list[Envelope]:
        claims.append(now)
        if len(claims) == 1:
            raise PermissionError(errno.EACCES, "Permission denied")
        if len(claims) == 3:
            runner._draining = True
        return await real_claim(now, limit)

    queue.claim = claim  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="test-runner"):
        asyncio.run(asyncio.wait_for(runner.run(), 10))
    assert len(claims) == 3
    assert "cannot take the due messages" in caplog.text and "Permission denied" in caplog.text


def test_a_message_claimed_with_every_recipient_done_is_only_removed(tmp_path: Path) -> None:
    """Its removal failed after the delivery (no permission on the queue for a while), so its
    state says done and it is due again: nothing is sent nor reported again."""
    runner, queue, boxes, _clock = make(tmp_path, {})
    env = envelope("D1", "bob@b.test", "carol@a.test")
    for rcpt in env.recipients:
        rcpt.status = "delivered"
    env.attempts = 1
    queue.messages["D1"] = (env, b"Subject: t\n\nbody\n")

    async def run() -> None:
        runner._start(env)
        await asyncio.gather(*runner._inflight.values())

    asyncio.run(run())
    assert "D1" not in queue.messages and boxes.delivered == []
    assert [c for c in queue.calls if c[1] != "D1"] == []  # no DSN queued
