"""Queue ids: unique across forked workers, sortable by time."""

from __future__ import annotations

import itertools
import os
import re

import pytest

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


def test_processes_with_the_same_pid_on_other_machines_make_other_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: the id was time + pid + sequence; nodes on two machines sharing one queue
    # (PostgreSQL) may have workers with the same pid, which then made the same id in the
    # same microsecond (the intake then refused one of the two messages with 452).
    import postroom.queue.envelope as envelope

    now = 1_800_000_000.123456
    made = set()
    for _machine in range(50):  # each a fresh process with pid 4242, sequence at 0
        monkeypatch.setattr(envelope, "_ID_PROCESS", (0, ""))
        monkeypatch.setattr(envelope, "_ID_SEQUENCE", itertools.count())
        monkeypatch.setattr(envelope.os, "getpid", lambda: 4242)
        made.add(new_queue_id(now))
    assert len(made) == 50


def test_ids_keep_their_shape() -> None:
    # Uppercase hex, at most 64 characters (sorting: the test above): check_id accepts them, and the
    # Maildir file names derived from them stay letters and digits.
    from postroom.queue.envelope import check_id

    qid = new_queue_id()
    check_id(qid)
    assert re.fullmatch(r"[0-9A-F]{32}", qid)
