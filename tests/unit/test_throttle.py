"""Login throttling: delays, lockout, and checks running side by side."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from postroom.app import build_services
from postroom.config import AuthConfig, from_dict
from postroom.throttle import LoginThrottle


def throttle(lockout: int = 3) -> LoginThrottle:
    return LoginThrottle(AuthConfig(lockout_failures=lockout), clock=lambda: 0.0)


def test_lockout_counts_failures_and_checks_still_running() -> None:
    t = throttle(lockout=3)
    t.failure("192.0.2.1", "a@x.test")
    with t.checking("192.0.2.1"), t.checking("192.0.2.1"):
        assert t.refused("192.0.2.1")  # 1 failure + 2 running = 3
        assert not t.refused("192.0.2.2")
    assert not t.refused("192.0.2.1")  # both ended well: 1 failure
    t.failure("192.0.2.1", None)
    t.failure("192.0.2.1", None)
    assert t.refused("192.0.2.1")


def test_parallel_guesses_get_no_more_checks_than_the_lockout_allows(tmp_path: Path) -> None:
    # Forty connections guessing at once all had their password checked: the failures were
    # counted only once each check was over, after the lockout test had passed for all of them.
    cfg = from_dict(
        {"domains": ["a.test"], "data_dir": str(tmp_path), "auth": {"lockout_failures": 5}}
    )
    services = build_services(cfg)
    checks, lock = [0], threading.Lock()

    def slow_verify(login: str, password: str) -> str | None:
        with lock:
            checks[0] += 1
        time.sleep(0.05)
        return None

    services.accounts.verify_password = slow_verify  # type: ignore[method-assign]

    async def guess(i: int) -> str | None:
        key = await services.check_password("192.0.2.9", "u@a.test", f"guess{i}")
        if key is None:
            services.throttle.failure("192.0.2.9", "u@a.test")
        return key

    async def main() -> None:
        await asyncio.gather(*(guess(i) for i in range(40)))

    asyncio.run(main())
    assert checks[0] == 5
    assert services.throttle.refused("192.0.2.9")
    services.cpu_executor.shutdown()
