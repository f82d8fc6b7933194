"""storage/local/queue.py's Draft: a message larger than INLINE_LIMIT waits in memory for its
end of DATA (within the worker's HoldBudget) and its body file is then written once, with the
prepended fields on top; past the budget or HOLD_LIMIT it is streamed into the file."""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path

import pytest

from postroom.blocking import BlockingPool
from postroom.errors import TemporaryStorageError
from postroom.storage.local import files
from postroom.storage.local import queue as local_queue
from postroom.storage.local.queue import INLINE_LIMIT, Draft, HoldBudget, SpareBodies
from postroom.wire import bulk

HEAD = b"Subject: big\r\n\r\n"
LINE = b"y" * 98 + b"\r\n"
RETURN_PATH = b"Return-Path: <s@r.test>\n"


def big_draft(tmp_path: Path, budget: HoldBudget, size: int, body_file: bool = True) -> Draft:
    draft = Draft(
        SpareBodies(tmp_path, None),
        "Q1",
        "s@r.test",
        lambda h: b"Received: r\n",
        1000,
        budget,
        body_file,
    )
    draft.write(HEAD)
    for _ in range(size // len(LINE)):
        draft.write(LINE)
    return draft


def stored(draft: Draft) -> tuple[bytes, str]:
    body, path, crc = draft.finish()
    if path:
        with open(path, "rb") as f:
            body = f.read()
        assert zlib.crc32(body) == crc  # what the journal records and recovery checks
    return body, path


def expected(size: int, fields: bytes = b"") -> bytes:
    return (
        RETURN_PATH
        + fields
        + b"Received: r\n"
        + (HEAD + LINE * (size // len(LINE))).replace(b"\r\n", b"\n")
    )


def test_a_held_message_gets_its_body_file_at_the_end_with_the_fields_on_top(
    tmp_path: Path,
) -> None:
    budget = HoldBudget()
    draft = big_draft(tmp_path, budget, 100_000)
    assert list(tmp_path.iterdir()) == []  # nothing written while it arrived
    assert 0 < budget.used < 100_000 - INLINE_LIMIT + len(LINE)
    draft.prepend(b"Authentication-Results: mx; spf=pass\r\n")
    body, path = stored(draft)
    assert path and Path(path).parent == tmp_path  # a body file: linked, never copied
    assert body == expected(100_000, b"Authentication-Results: mx; spf=pass\n")
    assert budget.used == 0


def test_past_the_budget_a_message_is_streamed_as_it_arrives(tmp_path: Path) -> None:
    budget = HoldBudget(limit=10_000)
    draft = big_draft(tmp_path, budget, 100_000)
    assert len(list(tmp_path.iterdir())) == 1 and budget.used == 0
    draft.prepend(b"X-Late: 1\r\n")  # the body file moves up under it
    body, path = stored(draft)
    assert path and body == expected(100_000, b"X-Late: 1\n")


def test_a_streamed_body_moves_up_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its client's part was read back whole at the end of DATA to move it up under the
    fields prepended since: every large message held its size in memory (resources probe:
    a burst of 40 MB messages took a worker to 1.4 GB). Now no read is larger than a chunk."""
    monkeypatch.setattr(local_queue, "MOVE_CHUNK", 4096, raising=False)
    reads: list[int] = []
    pread = local_queue.os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(local_queue.os, "pread", counted)
    draft = big_draft(tmp_path, HoldBudget(limit=0), 100_000)
    draft.prepend(b"X-Late: 1\r\n")
    draft.prepend(b"Authentication-Results: mx; spf=pass\r\n")
    body, path = stored(draft)
    fields = b"Authentication-Results: mx; spf=pass\nX-Late: 1\n"
    assert path and body == expected(100_000, fields)
    assert reads and max(reads) <= 4096


def test_past_the_hold_limit_a_message_is_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_queue, "HOLD_LIMIT", INLINE_LIMIT + 20_000)
    budget = HoldBudget()
    draft = big_draft(tmp_path, budget, 100_000)
    assert len(list(tmp_path.iterdir())) == 1 and budget.used == 0
    body, _path = stored(draft)
    assert body == expected(100_000)


def test_abort_and_a_dropped_draft_give_the_budget_back(tmp_path: Path) -> None:
    budget = HoldBudget()
    big_draft(tmp_path, budget, 100_000).abort()
    assert budget.used == 0
    big_draft(tmp_path, budget, 100_000)  # dropped: a session that went away mid-DATA
    assert budget.used == 0
    assert list(tmp_path.iterdir()) == []


def test_held_for_postgresql_the_message_stays_in_memory(tmp_path: Path) -> None:
    budget = HoldBudget()
    draft = big_draft(tmp_path, budget, 100_000, body_file=False)
    body, path = stored(draft)
    assert path == "" and body == expected(100_000)
    assert budget.used == 0 and list(tmp_path.iterdir()) == []


def test_streamed_for_postgresql_the_spill_file_is_read_back_once_and_removed(
    tmp_path: Path,
) -> None:
    draft = big_draft(tmp_path, HoldBudget(limit=0), 100_000, body_file=False)
    assert len(list(tmp_path.iterdir())) == 1  # streamed into a spill file
    draft.prepend(b"X-Late: 1\r\n")
    body, path, _crc = draft.finish()
    assert path == "" and body == expected(100_000, b"X-Late: 1\n")
    assert list(tmp_path.iterdir()) == []


def test_a_held_message_that_cannot_be_written_is_a_temporary_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = HoldBudget()
    draft = big_draft(tmp_path, budget, 100_000)

    def full(fd: int, parts: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_all", full)
    with pytest.raises(TemporaryStorageError):
        draft.finish()
    draft.abort()
    assert budget.used == 0 and list(tmp_path.iterdir()) == []  # no half-written body file


def test_memory_running_out_mid_data_is_a_temporary_failure_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a memory limit the MemoryError escaped the session, which was dropped mid-DATA
    with a traceback: the client was never told (exhaust probe). Now the rest is read and
    dropped, and the end of DATA gets the storage failure (452), like a full disk."""
    budget = HoldBudget()
    draft = big_draft(tmp_path, budget, 50_000)

    def no_memory(data: bytes) -> bytes:
        raise MemoryError

    monkeypatch.setattr(bulk, "crlf_to_lf", no_memory)
    draft.write(LINE)
    monkeypatch.undo()
    draft.write(LINE)  # read and dropped
    with pytest.raises(TemporaryStorageError, match="MemoryError"):
        draft.finish()
    assert budget.used == 0 and list(tmp_path.iterdir()) == []


def test_a_streamed_message_moves_up_under_its_fields_once_at_finish(tmp_path: Path) -> None:
    """Prepending to a streamed draft costs no I/O: its body file is rewritten once, by
    finish() (which finish_off_loop runs in a thread), whatever was prepended or replaced."""
    draft = big_draft(tmp_path, HoldBudget(limit=0), 100_000)
    assert len(list(tmp_path.iterdir())) == 1  # streamed: its body file exists
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()
    draft.prepend(b"X-One: 1\r\n")
    draft.prepend(b"X-Two: 2\r\n")
    assert path.read_bytes() == before  # nothing moved yet
    assert draft.head(1000) == HEAD.replace(b"\r\n", b"\n")  # the client's, not ours
    assert draft.whole().startswith(b"X-Two: 2\r\nX-One: 1\r\nReceived: r\r\n" + HEAD)
    body, _path = stored(draft)
    assert body == expected(100_000, b"X-Two: 2\nX-One: 1\n")


def test_a_streamed_message_replaced_after_a_prepend(tmp_path: Path) -> None:
    draft = big_draft(tmp_path, HoldBudget(limit=0), 100_000)
    draft.prepend(b"X-Forged: 1\r\n")
    whole = draft.whole()
    draft.replace(b"X-Ours: 1\r\n" + whole.split(b"\r\n", 1)[1])  # what _add_results does
    body, _path = stored(draft)
    assert (
        body
        == RETURN_PATH
        + b"X-Ours: 1\nReceived: r\n"
        + expected(100_000)[len(RETURN_PATH) + len(b"Received: r\n") :]
    )


def test_spare_bodies_closed_while_a_batch_is_made_leave_no_file(tmp_path: Path) -> None:
    # close() waits for the batch that take() started in the pool, then removes it too.
    async def main() -> None:
        spares = SpareBodies(tmp_path, BlockingPool(2))
        _path, made = spares.take()
        assert not made  # none ready yet: a batch is being made
        await spares.close()

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []


def _header_draft(tmp_path: Path, budget: HoldBudget, heads: list[bytes]) -> Draft:
    return Draft(
        SpareBodies(tmp_path, None),
        "Q2",
        "s@r.test",
        lambda h: heads.append(h) or b"Received: r\n",  # type: ignore[func-returns-value]
        1 << 20,
        budget,
    )


@pytest.mark.parametrize("split", [0, 1])
def test_a_header_section_still_coming_is_held_under_the_budget_too(
    tmp_path: Path, split: int
) -> None:
    """A header section was kept in memory until it was whole, outside the budget: a hundred
    connections each in the middle of a 1 MiB header section held 100 MiB. Past the budget it
    is spilled as a body is, and our fields are made once it is whole (its blank line split
    over two writes here too)."""
    budget = HoldBudget(limit=10_000)
    heads: list[bytes] = []
    draft = _header_draft(tmp_path, budget, heads)
    field = b"X-H: " + b"h" * 93 + b"\r\n"
    for _ in range(2_000):  # 200 KB of header fields
        draft.write(field)
    assert len(list(tmp_path.iterdir())) == 1 and budget.used == 0 and heads == []
    end = [b"\r\n", b"body\r\n"] if not split else [b"\r", b"\nbody\r\n"]
    for part in end:
        draft.write(part)
    client = (field * 2_000 + b"\r\nbody\r\n").replace(b"\r\n", b"\n")
    (head,) = heads  # made once, from the whole header section (and what came with it)
    assert head.startswith(client[: len(client) - len(b"body\n")])
    body, path = stored(draft)
    assert path and body == RETURN_PATH + b"Received: r\n" + client


@pytest.mark.parametrize("budget_limit", [10_000, 1 << 20])
def test_a_message_that_never_ends_its_header_section(tmp_path: Path, budget_limit: int) -> None:
    """Spilled, or held and given its body file at the end: our fields are made either way
    (held, it was stored without them, Received included, and two servers forwarding it to
    each other never saw the hop count grow)."""
    budget = HoldBudget(limit=budget_limit)
    heads: list[bytes] = []
    draft = _header_draft(tmp_path, budget, heads)
    field = b"X-H: " + b"h" * 93 + b"\r\n"
    for _ in range(1_000):
        draft.write(field)
    assert heads == []
    body, path = stored(draft)  # our fields made at the end, from what came
    client = (field * 1_000).replace(b"\r\n", b"\n")
    assert path and heads == [client] and body == RETURN_PATH + b"Received: r\n" + client


def test_large_rewrites_run_one_at_a_time_and_skip_what_needs_nothing(tmp_path: Path) -> None:
    # Each conversion holds several copies of its message: ten 40 MB submissions that
    # leave took 1.8 GB in one worker at once. And one that needs nothing made those copies
    # too before it found out.
    budget = HoldBudget(limit=0)
    folders = [tmp_path / str(i) for i in range(4)]
    for folder in folders:
        folder.mkdir()
    drafts = [big_draft(folder, budget, 2 * INLINE_LIMIT) for folder in folders[:3]]
    running: list[int] = []
    peak = 0

    def convert(data: bytes) -> bytes:
        nonlocal peak
        running.append(1)
        peak = max(peak, len(running))
        time.sleep(0.05)  # (in a thread: the others would start meanwhile)
        running.pop()
        return data.replace(b"y", b"z")

    async def rewrite_all() -> None:
        await asyncio.gather(*(d.rewrite(convert) for d in drafts))

    asyncio.run(rewrite_all())
    assert peak == 1
    assert b"zzz" in stored(drafts[0])[0]

    untouched = big_draft(folders[3], budget, 2 * INLINE_LIMIT)

    def never(data: bytes) -> bytes:
        raise AssertionError("converted although nothing needed it")

    asyncio.run(untouched.rewrite(never, lambda lf: b"\r" in lf))
    assert stored(untouched)[0] == expected(2 * INLINE_LIMIT)
