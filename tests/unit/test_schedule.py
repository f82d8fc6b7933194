"""Retry timing (queue/schedule.py): the waits of [delivery] retry_intervals, last repeating."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postroom.queue import schedule

INTERVALS = [300.0, 900.0, 1800.0]


def test_waits_follow_the_intervals_and_the_last_repeats() -> None:
    assert schedule.next_attempt(1000.0, 0, INTERVALS) == 1000.0
    assert [schedule.next_attempt(0.0, n, INTERVALS) for n in (1, 2, 3, 4, 9)] == [
        300.0,
        900.0,
        1800.0,
        1800.0,
        1800.0,
    ]


def test_jitter_only_lengthens() -> None:
    assert schedule.next_attempt(0.0, 1, INTERVALS, jitter=0.1) == 330.0


def test_the_last_try_comes_when_max_queue_time_is_up() -> None:
    # With retry_intervals = ["1h"] and max_queue_time = "5s", the bounce came an hour late.
    assert schedule.next_attempt(0.0, 1, [3600.0], deadline=5.0) == 5.0
    assert schedule.next_attempt(0.0, 1, [3600.0], deadline=7200.0) == 3600.0


def test_expiry() -> None:
    assert not schedule.expired(0.0, 5 * 86400 - 1, 5 * 86400)
    assert schedule.expired(0.0, 5 * 86400, 5 * 86400)


@given(st.floats(0, 1e9), st.integers(1, 1000), st.floats(0, 0.5))
def test_next_attempt_is_never_in_the_past(now: float, failures: int, jitter: float) -> None:
    assert schedule.next_attempt(now, failures, INTERVALS, jitter) >= now + INTERVALS[0]
