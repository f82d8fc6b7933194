"""When to try a message again, and when to give up (pure: time is passed in).

``[delivery] retry_intervals`` are the waits after each temporary failure, the last one
repeating; ``max_queue_time`` after arrival a message bounces. A little jitter (passed in as a
fraction) keeps many deferred messages from retrying in the same second.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_attempt(
    now: float,
    failures: int,
    intervals: Sequence[float],
    jitter: float = 0.0,
    deadline: float = float("inf"),
) -> float:
    """The time of the next try after the ``failures``-th temporary failure (1-based), but
    not after ``deadline`` (when ``max_queue_time`` is up: one last try, then the bounce).
    Once the deadline has passed (that last try could not finish: its report could not be
    queued, or it failed) the waits apply again: never an immediate retry loop."""
    if failures < 1:
        return now
    wait = intervals[min(failures, len(intervals)) - 1]
    later = now + wait * (1.0 + jitter)
    return later if deadline <= now else min(later, deadline)


def expired(created: float, now: float, max_queue_time: float) -> bool:
    """True once a message has been queued for ``max_queue_time`` or longer."""
    return now - created >= max_queue_time
