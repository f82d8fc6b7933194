"""Password checks on a few threads: a client that logged in before goes ahead of a campaign."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from postroom import password_checks
from postroom.password_checks import PasswordChecks

USER = "user@a.test"
HOME = "192.0.2.1"


class Gate:
    """A verifier that records the order in which checks start and holds each one until
    the test opens the gate; the right password is ``right``."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.open = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, login: str, password: str) -> str | None:
        with self._lock:
            self.started.append(f"{login}/{password}")
        assert self.open.wait(10)
        return login if password == "right" else None


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def run(
    main: Callable[[PasswordChecks, Gate], Coroutine[Any, Any, None]], threads: int = 2
) -> Gate:
    checks, gate = PasswordChecks(threads), Gate()
    try:
        asyncio.run(main(checks, gate))
    finally:
        gate.open.set()
        checks.close()
    return gate


def waiting(checks: PasswordChecks) -> int:
    """Checks waiting for a thread (a cancelled caller's turn is left in place, skipped)."""
    return sum(not turn.done() for w in checks._waiting for turn in w)


def test_a_client_that_logged_in_before_goes_ahead_of_a_campaign() -> None:
    async def main(checks: PasswordChecks, gate: Gate) -> None:
        gate.open.set()
        assert await checks.check(HOME, USER, "right", gate) == USER
        gate.open.clear()
        campaign = [
            asyncio.ensure_future(checks.check(f"198.51.100.{i}", USER, f"guess{i}", gate))
            for i in range(20)
        ]
        await until(lambda: waiting(checks) == 19)
        mine = asyncio.ensure_future(checks.check(HOME, USER.upper(), "right", gate))
        await until(lambda: waiting(checks) == 20)
        gate.open.set()
        assert await mine == USER.upper()
        assert await asyncio.gather(*campaign) == [None] * 20

    gate = run(main, threads=1)
    # The thread was busy with the campaign's first guess; the known client was next.
    assert gate.started == [
        f"{USER}/right",
        f"{USER}/guess0",
        f"{USER.upper()}/right",
        *(f"{USER}/guess{i}" for i in range(1, 20)),
    ]


def test_a_new_client_or_a_failure_waits_its_turn() -> None:
    async def main(checks: PasswordChecks, gate: Gate) -> None:
        gate.open.set()
        assert await checks.check(HOME, USER, "right", gate) == USER
        assert await checks.check(HOME, USER, "wrong", gate) is None  # the pair is forgotten
        gate.open.clear()
        first = [checks.check(f"198.51.100.{i}", USER, f"guess{i}", gate) for i in range(3)]
        tasks = [asyncio.ensure_future(c) for c in first]
        await until(lambda: waiting(checks) == 2)
        tasks.append(asyncio.ensure_future(checks.check(HOME, USER, "right", gate)))
        tasks.append(asyncio.ensure_future(checks.check("203.0.113.5", USER, "right", gate)))
        await until(lambda: waiting(checks) == 4)
        gate.open.set()
        await asyncio.gather(*tasks)

    gate = run(main, threads=1)
    assert gate.started == [
        f"{USER}/right",
        f"{USER}/wrong",
        f"{USER}/guess0",
        f"{USER}/guess1",
        f"{USER}/guess2",
        f"{USER}/right",
        f"{USER}/right",
    ]


def test_a_client_that_failed_recently_waits_behind_a_new_one() -> None:
    async def main(checks: PasswordChecks, gate: Gate) -> None:
        gate.open.set()
        assert await checks.check(HOME, USER, "right", gate) == USER
        gate.open.clear()
        busy = asyncio.ensure_future(checks.check("198.51.100.1", USER, "guess0", gate, True))
        await until(lambda: checks._free == 0)
        tasks = [
            asyncio.ensure_future(checks.check(f"198.51.100.{i}", USER, f"guess{i}", gate, True))
            for i in range(1, 4)
        ]
        await until(lambda: waiting(checks) == 3)
        tasks.append(asyncio.ensure_future(checks.check("203.0.113.5", USER, "new", gate)))
        await until(lambda: waiting(checks) == 4)
        # Known goes first even if its IP failed (a typo at home): the pair says who it is.
        tasks.append(asyncio.ensure_future(checks.check(HOME, USER, "right", gate, True)))
        await until(lambda: waiting(checks) == 5)
        gate.open.set()
        await asyncio.gather(busy, *tasks)

    gate = run(main, threads=1)
    assert gate.started == [
        f"{USER}/right",
        f"{USER}/guess0",
        f"{USER}/right",
        f"{USER}/new",
        f"{USER}/guess1",
        f"{USER}/guess2",
        f"{USER}/guess3",
    ]


def test_a_known_pair_expires_and_the_oldest_is_dropped_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(password_checks, "MAX_KNOWN", 2)
    now = [0.0]
    checks = PasswordChecks(1, clock=lambda: now[0])

    def right(login: str, password: str) -> str | None:
        return login

    async def main() -> None:
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            await checks.check(ip, USER, "pw", right)
        assert [checks.knows(ip, USER) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [
            False,
            True,
            True,
        ]
        assert checks.knows("192.0.2.3", USER.upper())
        now[0] = password_checks.KNOWN_TIME + 1
        assert not checks.knows("192.0.2.3", USER)

    try:
        asyncio.run(main())
    finally:
        checks.close()


def test_a_cancelled_caller_holds_its_thread_until_its_check_ends() -> None:
    async def main(checks: PasswordChecks, gate: Gate) -> None:
        running = asyncio.ensure_future(checks.check(HOME, USER, "a", gate))
        queued = asyncio.ensure_future(checks.check(HOME, USER, "b", gate))
        last = asyncio.ensure_future(checks.check(HOME, USER, "right", gate))
        await until(lambda: waiting(checks) == 2)
        queued.cancel()  # gone before its turn: skipped
        running.cancel()  # gone while its check runs: argon2 still holds the thread
        for _ in range(10):  # the cancellations run their course on the loop; no thread is
            await asyncio.sleep(0)  # given back (that would come from a done check's thread)
        assert waiting(checks) == 1 and checks._free == 0
        gate.open.set()
        assert await last == USER
        await until(lambda: checks._free == 1)

    gate = run(main, threads=1)
    assert gate.started == [f"{USER}/a", f"{USER}/right"]


def test_a_caller_cancelled_as_it_gets_a_thread_gives_it_back() -> None:
    async def main(checks: PasswordChecks, gate: Gate) -> None:
        first = asyncio.ensure_future(checks.check(HOME, USER, "a", gate))
        second = asyncio.ensure_future(checks.check(HOME, USER, "b", gate))
        await until(lambda: waiting(checks) == 1)
        give_back = checks._give_back

        def and_cancel() -> None:  # the turn is handed over, then its caller goes away
            give_back()
            second.cancel()

        checks._give_back = and_cancel  # type: ignore[method-assign]
        gate.open.set()
        assert await first is None
        await until(lambda: checks._free == 1)
        assert second.cancelled()

    gate = run(main, threads=1)
    assert gate.started == [f"{USER}/a"]
