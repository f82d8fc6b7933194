"""Queue ids: unique across forked workers, sortable by time."""

from __future__ import annotations

import os

from postroom.queue.envelope import new_queue_id


def test_forked_processes_never_make_the_same_id_in_the_same_microsecond() -> None:
    # Regression: the sequence number was copied by fork, so the primary and a worker made the
    # same id in the same microsecond; the second Maildir file then replaced the first.
    now = 1_800_000_000.123456
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a forked worker
        os.close(read_end)
        os.write(write_end, ",".join(new_queue_id(now) for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    mine = {new_queue_id(now) for _ in range(100)}
    with os.fdopen(read_end, "rb") as fh:
        theirs = set(fh.read().decode().split(","))
    os.waitpid(pid, 0)
    assert len(mine) == len(theirs) == 100
    assert not mine & theirs


def test_ids_sort_by_time_and_are_alphanumeric() -> None:
    early, late = new_queue_id(1_800_000_000.0), new_queue_id(1_800_000_001.0)
    assert early < late and early.isalnum() and late.isalnum()
