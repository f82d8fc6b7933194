"""A bounce that could not be queued (the disk full, the queue refusing it with a 452) was lost
for good: the attempt that found the permanent failure had already marked the recipient
"bounced", and the error path stored that state, so the retry the runner's comment promised
found nothing left to report. Now the DSN is stored as owed with the outcome it reports
(``Envelope.reports``), before it is queued: the message stays queued with it, and its next
attempt (after a retry interval, never at once) queues it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from postroom.errors import TemporaryStorageError
from postroom.queue.envelope import Attempt, Envelope
from postroom.resolver import RouteFailure
from postroom.storage.interfaces import LocalCopy, MessageDraft
from tests.unit.test_runner import MemoryQueue, accept, envelope, make, settle


class FullForBounces(MemoryQueue):
    """Refuses the reports (null sender) while ``full`` is set, as a full disk would."""

    full = True

    async def accept(
        self,
        envelope: Envelope,
        draft: MessageDraft,
        deliver_now: Sequence[LocalCopy],
        hold: bool = False,
    ) -> list[OSError | None]:
        if self.full and not envelope.sender:
            raise TemporaryStorageError("No space left on device")
        return await super().accept(envelope, draft, deliver_now, hold)


def test_a_bounce_refused_by_the_queue_is_made_at_the_next_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner, _queue, _boxes, clock = make(tmp_path, {})  # every domain: NXDOMAIN
    queue = FullForBounces()
    runner.queue = runner.services.queue = queue
    runner.mailboxes.queue = queue
    env = envelope("Q1", "bob@nowhere.test")
    with caplog.at_level(logging.WARNING, logger="test-runner"):
        asyncio.run(accept(runner, env))
    # A full disk is a handled case: one warning line, not a traceback (the log promises it).
    (line,) = [r for r in caplog.records if "notification" in r.getMessage()]
    assert line.levelname == "WARNING" and line.exc_info is None
    assert [e.sender for e, _b in queue.messages.values()] == ["alice@a.test"]  # no report yet
    (rcpt,) = env.recipients
    assert rcpt.status == "bounced" and "5.1.2" in (rcpt.last_error or "")
    assert [p.recipients for p in env.reports] == [[0]]  # owed, and stored so
    assert queue.stored["Q1"][0] == env.to_json()
    assert "Q1" in queue.messages and env.next_attempt > clock.now

    queue.full = False
    clock.now = env.next_attempt

    async def retry() -> None:
        runner._start(env)
        await settle(runner)

    asyncio.run(retry())
    (report,) = [b for e, b in queue.accepted.values() if not e.sender]
    assert b"bob@nowhere.test" in report and b"Status: 5.1.2" in report
    assert not queue.messages and not env.reports


def test_an_expired_message_whose_bounce_is_refused_waits_for_the_next_interval(
    tmp_path: Path,
) -> None:
    # Deferred until max_queue_time, then the report refused: kept deferred, and retried after
    # the last retry interval, not at the deadline already past (an immediate retry loop).
    runner, _queue, _boxes, clock = make(tmp_path, {"b.test": RouteFailure("4.4.3", "SERVFAIL")})
    queue = FullForBounces()
    runner.queue = runner.services.queue = queue
    env = envelope("Q1", "bob@b.test")
    asyncio.run(accept(runner, env))
    clock.now = env.created + 86400 + 1  # max_queue_time ("1d") is up

    async def attempt() -> None:
        runner._start(env)
        await settle(runner)

    asyncio.run(attempt())
    (rcpt,) = env.recipients
    assert rcpt.status == "bounced" and "SERVFAIL" in (rcpt.last_error or "")
    assert env.reports and "Q1" in queue.messages
    assert env.next_attempt >= clock.now + 3600  # retry_intervals = ["5m", "1h"]
    queue.full = False
    clock.now = env.next_attempt
    asyncio.run(attempt())
    (report,) = [b for e, b in queue.accepted.values() if not e.sender]
    assert b"Status: 4.4.3" in report and b"SERVFAIL" in report
    assert not queue.messages


class RecordFailsOnce(MemoryQueue):
    """Refuses the first record of ``Q1``, or its release (the disk full for that write)."""

    failed = False

    def _refuse(self, envelope: Envelope) -> None:
        if envelope.id == "Q1" and not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        self._refuse(envelope)
        await super().record(envelope, attempts)

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        self._refuse(envelope)
        await super().finish(envelope, attempts)


def test_a_bounce_queued_when_its_messages_record_fails_is_not_left_behind(
    tmp_path: Path,
) -> None:
    """The bounce was queued, then the record saying so failed: the bounce was neither started
    nor scheduled, so the running server never tried it (it went out after a restart). It is
    recorded, due, for the queue to try (asking first whether the message still owes it)."""
    runner, _queue, _boxes, _clock = make(tmp_path, {})  # every domain: NXDOMAIN
    queue = RecordFailsOnce()
    runner.queue = runner.services.queue = queue
    runner.mailboxes.queue = queue
    asyncio.run(accept(runner, envelope("Q1", "bob@nowhere.test")))
    (report,) = [e.id for e, _b in queue.accepted.values() if not e.sender]
    assert ("record", report) in queue.calls or ("finish", report) in queue.calls
