"""The queue runner with an injected resolver, clock and jitter, over an in-memory queue: every
outcome (delivered, deferred, bounced, expired) without sockets, DNS or sleeping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from postroom import config as config_mod
from postroom.queue.envelope import Attempt, Envelope, Recipient
from postroom.queue.runner import Accepted, QueueRunner
from postroom.resolver import Route, RouteFailure, StaticResolver
from postroom.storage.interfaces import LocalCopy, MessageDraft

NOW = 1_800_000_000.0


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


class MemoryQueue:
    """What the runner asks of a queue, kept in dicts; every call is recorded."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[Envelope, bytes]] = {}
        self.calls: list[tuple[str, str]] = []
        self.failing_copies: set[str] = set()

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
        self.calls.append(("accept", envelope.id))
        self.messages[envelope.id] = (envelope, draft.data)
        return [
            OSError(28, "No space left on device") if c.mailbox in self.failing_copies else None
            for c in deliver_now
        ]

    async def claim(self, now: float, limit: int) -> list[Envelope]:
        return [e for e, _b in self.messages.values() if e.next_attempt <= now][:limit]

    async def begin_attempt(self, envelope: Envelope) -> None:
        self.calls.append(("begin", envelope.id))

    async def body(self, envelope: Envelope) -> bytes:
        return self.messages[envelope.id][1]

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        self.calls.append(("record", envelope.id))

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        self.calls.append(("finish", envelope.id))
        del self.messages[envelope.id]

    async def delete(self, queue_id: str) -> None:
        del self.messages[queue_id]

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
        self.delivered: list[tuple[str, str]] = []

    async def deliver(
        self, envelope: Envelope, copies: Sequence[LocalCopy]
    ) -> list[OSError | None]:
        out: list[OSError | None] = []
        for c in copies:
            if c.mailbox in self.queue.failing_copies:
                out.append(OSError(13, "Permission denied"))
            else:
                self.delivered.append((envelope.id, c.mailbox))
                out.append(None)
        return out


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


async def accept(runner: QueueRunner, env: Envelope) -> Accepted:
    draft = runner.queue.draft(env.id, env.sender)
    draft.write(b"Subject: t\r\n\r\nbody\r\n")
    result = await runner.accept(env, draft)
    assert isinstance(result, Accepted)
    await asyncio.gather(*runner._inflight.values())
    return result


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


def test_a_permanent_failure_bounces_to_the_sender_through_the_same_hand_off(
    tmp_path: Path,
) -> None:
    runner, queue, _boxes, _clock = make(tmp_path, {})  # every domain: NXDOMAIN
    env = envelope("Q1", "bob@nowhere.test")
    asyncio.run(accept(runner, env))
    assert env.recipients[0].status == "bounced"
    (dsn_id,) = [qid for kind, qid in queue.calls if kind == "accept" and qid != "Q1"]
    assert ("finish", "Q1") in queue.calls and "Q1" not in queue.messages
    dsn, report = queue.messages[dsn_id]
    assert dsn.sender == "" and [(r.address, r.status) for r in dsn.recipients] == [
        ("alice@a.test", "delivered")  # its copy made at acceptance, like any message's
    ]
    assert b"multipart/report" in report and b"\r\n" not in report


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


def test_a_message_whose_copies_are_all_made_at_acceptance_is_not_held(tmp_path: Path) -> None:
    runner, queue, _boxes, _clock = make(tmp_path, {})
    env = envelope("Q1", "alice@a.test")
    asyncio.run(accept(runner, env))
    assert queue.calls == [("accept", "Q1")] and env.attempts == 0


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
