"""Login throttling: lockout, and password checks of one IP taking turns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

from postroom.app import Shared, build_services
from postroom.config import AuthConfig, Duration, from_dict
from postroom.errors import LockedOut
from postroom.services import Services
from postroom.throttle import CHECKS_PER_IP, LoginThrottle


def test_lockout_after_failures_and_not_reset_by_a_success() -> None:
    t = LoginThrottle(AuthConfig(lockout_failures=3), clock=lambda: 0.0)
    for _ in range(2):
        t.failure("192.0.2.1", "victim@x.test")
    assert not t.refused("192.0.2.1") and not t.refused("192.0.2.2")
    t.failure("192.0.2.1", None)
    assert t.refused("192.0.2.1")


def test_lockout_failures_0_is_no_lockout() -> None:
    """0 refused every login, a right password too (454): it now means no lockout, as a
    limit of 0 does in Postfix's anvil."""
    t = LoginThrottle(AuthConfig(lockout_failures=0), clock=lambda: 0.0)
    assert not t.refused("192.0.2.1")
    for _ in range(50):
        t.failure("192.0.2.1", None)
    assert not t.refused("192.0.2.1")


def test_failures_of_one_account_add_up_over_every_worker() -> None:
    """An account guessed at from many IPs is slowed down by its own count, which every
    worker process shares (each worker counted for itself: N workers, N times the guesses
    before the delay grew)."""
    cfg = AuthConfig(lockout_failures=100, free_failures=3, failure_delay=Duration(1))
    shared = Shared.for_workers(2)

    def worker() -> LoginThrottle:
        return LoginThrottle(cfg, lambda: 0.0, shared.logins, shared.accounts)

    pid = os.fork()
    if pid == 0:  # the other worker
        for i in range(4):
            worker().failure(f"192.0.2.{i}", "ann@a.test")
        os._exit(0)
    os.waitpid(pid, 0)
    assert worker().failure("198.51.100.1", "ann@a.test") == 4.0  # its 5th: 2 ** (5 - 3)
    assert worker().failure("198.51.100.1", "bob@a.test") == 1.0  # another's: the IP's 2nd


def services_with(tmp_path: Path, verify: object, lockout: int) -> Services:
    cfg = from_dict(
        {"domains": ["a.test"], "data_dir": str(tmp_path), "auth": {"lockout_failures": lockout}}
    )
    services, _runner = build_services(cfg)
    services.accounts.verify_password = verify  # type: ignore[assignment]
    return services


def test_parallel_guesses_get_few_checks(tmp_path: Path) -> None:
    # Forty connections guessing at once all had their password checked: each passed the
    # lockout test before the first of them had failed.
    checks, lock = [0], threading.Lock()

    def wrong(login: str, password: str) -> str | None:
        with lock:
            checks[0] += 1
        time.sleep(0.02)
        return None

    services = services_with(tmp_path, wrong, lockout=5)

    async def guess(i: int) -> None:
        with contextlib.suppress(LockedOut):  # locked out while waiting: no check, no failure
            if await services.check_password("192.0.2.9", "u@a.test", f"guess{i}") is None:
                services.throttle.failure("192.0.2.9", "u@a.test")

    async def main() -> None:
        await asyncio.gather(*(guess(i) for i in range(40)))

    asyncio.run(main())
    assert 5 <= checks[0] <= 5 + CHECKS_PER_IP - 1
    services.password_checks.close()


def test_many_correct_logins_at_once_all_succeed(tmp_path: Path) -> None:
    # Counting checks still running as failures refused correct logins beyond the lockout
    # (webmail, NAT): turns make them wait a moment instead.
    def right(login: str, password: str) -> str | None:
        time.sleep(0.01)
        return login

    services = services_with(tmp_path, right, lockout=5)

    async def main() -> list[str | None]:
        return await asyncio.gather(
            *(services.check_password("192.0.2.7", f"u{i}@a.test", "pw") for i in range(30))
        )

    assert asyncio.run(main()) == [f"u{i}@a.test" for i in range(30)]
    assert not services.throttle._slots  # nothing kept for an IP with no check running
    services.password_checks.close()


def test_an_ip_that_failed_recently_is_checked_after_a_new_one(tmp_path: Path) -> None:
    started: list[str] = []
    gate = threading.Event()

    def held(login: str, password: str) -> str | None:
        started.append(password)
        assert gate.wait(10)
        return None

    services = services_with(tmp_path, held, lockout=5)
    services.throttle.failure("198.51.100.9", "u@a.test")

    async def main() -> None:
        busy = [services.check_password("192.0.2.1", "u@a.test", f"busy{i}") for i in range(4)]
        tasks = [asyncio.ensure_future(c) for c in busy]
        while len(started) < 4:  # every argon2 thread taken
            await asyncio.sleep(0.005)
        for ip, password in (("198.51.100.9", "x"), ("203.0.113.1", "new")):
            tasks.append(asyncio.ensure_future(services.check_password(ip, "u", password)))
            queued = len(tasks) - 4
            while sum(map(len, services.password_checks._waiting)) < queued:
                await asyncio.sleep(0.005)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert started[4:] == ["new", "x"]
    services.password_checks.close()


def test_a_check_whose_ip_is_locked_out_before_its_turn_is_not_made(tmp_path: Path) -> None:
    gate, checked = threading.Event(), []

    def held(login: str, password: str) -> str | None:
        checked.append(password)
        assert gate.wait(10)
        return None

    services = services_with(tmp_path, held, lockout=2)

    async def main() -> None:
        ip = "192.0.2.4"
        busy = [
            asyncio.ensure_future(services.check_password(ip, "u@a.test", f"g{i}"))
            for i in range(CHECKS_PER_IP)
        ]
        while len(checked) < CHECKS_PER_IP:  # the IP's every turn taken
            await asyncio.sleep(0.005)
        mine = asyncio.ensure_future(services.check_password(ip, "u@a.test", "right"))
        await asyncio.sleep(0.05)
        for _ in range(2):
            services.throttle.failure(ip, None)
        gate.set()
        await asyncio.gather(*busy)
        with pytest.raises(LockedOut):
            await mine

    asyncio.run(main())
    assert "right" not in checked
    services.password_checks.close()
