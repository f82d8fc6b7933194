"""The per-IP table the workers share: counts across a fork, deletion inside probe runs,
ageing, and forgetting when full."""

from __future__ import annotations

import os
import random
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.sharedcounts import LocalCounts, SharedCounts


def test_a_count_made_in_one_process_is_seen_in_another() -> None:
    table = SharedCounts(rows=64)
    table.add("192.0.2.1", 3)
    pid = os.fork()
    if pid == 0:  # another worker
        table.add("192.0.2.1", 2)
        table.add("2001:db8::1", 1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.get("192.0.2.1") == 5
    assert table.get("2001:db8::1") == 1
    assert table.get("::ffff:192.0.2.1") == 5  # the same host, written as v4-mapped


def test_the_loopback_v6_client_is_counted_like_any_other() -> None:
    """Its key (the /64 ::/64, the rest zeros) was the empty row's: every ::1 connection took
    one off the table's use count, and a client hashed to its row wiped its count (v6e2e)."""
    table = SharedCounts(rows=8)
    for _ in range(10):
        assert table.add("::1", 1) == 1
        assert table.add("::1", -1) == 0
    assert table.used.value == 0
    table.add("::1", 3)
    for n in range(5):
        table.add(f"192.0.2.{n}", 1)
    assert table.get("::1") == 3 and table.get("::2") == 3  # one /64
    assert table.used.value == 6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(-2, 2)), max_size=80))
def test_matches_a_dict_through_collisions_and_deletions(ops: list[tuple[int, int]]) -> None:
    table = SharedCounts(rows=16)  # 12 addresses in 16 rows: long probe runs
    model: dict[str, int] = {}
    for n, delta in ops:
        ip = f"10.0.0.{n}"
        model[ip] = max(0, model.get(ip, 0) + delta)
        assert table.add(ip, delta) == model[ip]
        for other in (f"10.0.0.{k}" for k in range(12)):
            assert table.get(other) == model.get(other, 0), other
    assert table.used.value == sum(1 for v in model.values() if v)
    local = LocalCounts()  # the one-worker version answers the same
    for n, delta in ops:
        local.add(f"10.0.0.{n}", delta)
    assert {ip: local.get(ip) for ip in model} == model


def test_counts_age_out() -> None:
    now = [1000.0]
    table = SharedCounts(rows=16, clock=lambda: now[0])
    assert table.add("192.0.2.7", 1, max_age=300) == 1
    now[0] += 100
    assert table.add("192.0.2.7", 1, max_age=300) == 2
    now[0] += 301
    assert table.get("192.0.2.7", max_age=300) == 0
    assert table.add("192.0.2.7", 1, max_age=300) == 1


def test_a_flood_of_addresses_is_forgotten_not_grown() -> None:
    now = [0.0]
    table = SharedCounts(rows=64, clock=lambda: now[0])
    rng = random.Random(7)
    for i in range(1000):
        now[0] = float(i)
        table.add(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{i % 256}", 1)
        assert table.used.value <= 48
    assert table.get(f"10.{rng.randrange(256)}.0.0") in (0, 1)
    now[0] += 1
    table.add("192.0.2.9", 2)  # the newest rows stay
    assert table.get("192.0.2.9") == 2


def test_ipv6_clients_are_counted_per_64_and_ipv4_per_address() -> None:
    """A host picks its own addresses inside its /64 (RFC 8981): one address per connection
    or per guessed password must not make a fresh client each time."""
    for table in (SharedCounts(rows=64), LocalCounts()):
        for n in range(1, 6):
            table.add(f"2001:db8:1:2::{n:x}", 1)
        assert table.get("2001:db8:1:2:ffff:ffff:ffff:ffff") == 5
        assert table.get("2001:db8:1:3::1") == 0  # the next /64: another client
        table.add("192.0.2.1", 1)
        assert table.get("192.0.2.2") == 0  # IPv4: each address for itself
        assert table.get("::ffff:192.0.2.1") == 1  # the same host, written as v4-mapped


def test_the_connections_of_a_worker_that_died_stop_counting() -> None:
    """Per worker tables, summed: a dead worker's table is cleared, where one shared table
    kept its clients' connections counted against their IP until the server restarted."""
    from postroom.app import Shared

    shared = Shared.for_workers(2)
    first, second = shared.connections(0), shared.connections(1)
    assert first.add("192.0.2.1", 1) == 1 and second.add("192.0.2.1", 1) == 2
    assert second.add("192.0.2.1", 1) == 3 and first.get("192.0.2.1") == 3
    shared.worker_gone(1)  # killed: its two connections are gone with it
    assert first.get("192.0.2.1") == 1 and shared.connections(1).add("192.0.2.1", 1) == 2
    single = Shared.for_workers(1)
    assert single.connections(0).add("192.0.2.1", 1) == 1
    single.worker_gone(0)  # (one worker: its own dict, dropped with it)


def test_a_lock_whose_holder_was_killed_is_given_back() -> None:
    # A POSIX semaphore stays taken when its holder dies: a worker killed with SIGKILL while
    # counting froze the supervisor (in clear(), deaf to SIGTERM) and every other worker.
    counts = SharedCounts(rows=64)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        with counts._locked():
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with pytest.raises(TimeoutError):
        counts.clear(wait=0.2)
    assert not counts.repair(pid + 1)  # only the dead holder's
    assert counts.repair(pid)
    counts.clear(wait=1.0)
    assert counts.add("192.0.2.1", 1) == 1


@pytest.mark.parametrize("gap", ["after taking it", "before giving it back"])
def test_a_lock_whose_holder_was_killed_before_naming_itself_is_given_back(gap: str) -> None:
    # Killed between taking the lock and naming itself (or between unnaming itself and
    # giving it back), a worker left it taken with no holder: repair() freed nothing and
    # the other workers waited on it for good.
    counts = SharedCounts(rows=64)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        counts._lock.acquire()
        if gap == "before giving it back":
            counts._holder.value = os.getpid()
            counts._holder.value = 0
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert counts.repair(pid)
    counts.clear(wait=1.0)
    assert counts.add("192.0.2.1", 1) == 1
    assert not counts.repair(pid)  # free now: nothing to give back
