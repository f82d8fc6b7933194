"""The local queue's storage (journal, writer, deferred store) against a model, with a kill -9
simulated between any two of its system calls.

A crash is an exception raised by the N-th file-system call the writer makes (N chosen by
hypothesis): everything written before it stays (kill -9 keeps the page cache), nothing after
it happens. The next writer's recovery must then leave: every acknowledged message's local
copies present exactly once, every acknowledged message still held by the queue either parked
or (if its release was acknowledged) gone, and nothing that was never acknowledged twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from postroom.queue.envelope import Envelope, Recipient
from postroom.storage.local import journal
from postroom.storage.local import maildir_writer as mw
from postroom.storage.local.deferred import DeferredStore
from postroom.storage.local.journal import Entry, Target

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Crash(BaseException):
    """kill -9: nothing after this system call happens."""


_PATCHED = ("fdatasync", "fsync", "link", "replace", "rename", "unlink", "pwrite", "writev")


class Faults:
    """Counts the writer's file-system calls and crashes at the chosen one."""

    def __init__(self) -> None:
        self.left: int | None = None
        self.real = {name: getattr(os, name) for name in _PATCHED}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, real in self.real.items():
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.left is not None:
                if self.left == 0:
                    self.left = None
                    raise Crash
                self.left -= 1
            return real(*args, **kwargs)

        return call


class ManualSyncer(journal.Syncer):
    """The syncer's work, done when the test says (no thread)."""

    def __init__(self) -> None:
        self._batches = []

    def add(self, batch: journal.Batch) -> None:
        self._batches.append(batch)

    def run_now(self) -> None:
        batches, self._batches = self._batches, []
        self._sync(batches)

    def stop(self) -> None:
        self.run_now()


class QueueMachine(RuleBasedStateMachine):
    monkeypatch: pytest.MonkeyPatch

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="queue-sm-"))
        self.journal = self.root / "journal"
        self.journal.mkdir()
        self.faults = Faults()
        self.faults.install(self.monkeypatch)
        self.monkeypatch.setattr(journal, "Syncer", ManualSyncer)
        self.monkeypatch.setattr(journal, "syncfs", lambda d: None)
        self.writer = self._start()
        self.n = 0
        self.acked: dict[str, list[str]] = {}  # queue id -> its copies' paths
        self.maybe: set[str] = set()  # sent, answer lost in a crash: at most once
        self.held: set[str] = set()  # acknowledged and kept by the queue
        self.parked: set[str] = set()
        self.maybe_gone: set[str] = set()  # release or park cut by a crash

    def _start(self) -> mw.JournalWriter:
        self.faults.left = None
        writer = mw.JournalWriter(str(self.journal))
        writer._spares.off()  # keep it simple: the tmp/ route
        return writer

    def teardown(self) -> None:
        self.faults.left = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _box(self, i: int) -> str:
        return str(self.root / "mail" / f"u{i}")

    # -- rules ----------------------------------------------------------------------------

    @rule(
        locals_=st.integers(0, 2),
        remote=st.booleans(),
        large=st.booleans(),
        crash=st.none() | st.integers(0, 12),
    )
    def accept(self, locals_: int, remote: bool, large: bool, crash: int | None) -> None:
        self.n += 1
        qid = f"Q{self.n}"
        rcpts = [Recipient(f"u{i}@x.test") for i in range(locals_)]
        rcpts += [Recipient("r@remote.test")] if remote else []
        env = Envelope(qid, "s@x.test", rcpts or [Recipient("r@remote.test")], 1.0)
        body = b"Return-Path: <s@x.test>\nSubject: " + qid.encode() + b"\n\n" + b"x" * 100
        targets = tuple(Target(i, self._box(i), f"1.{qid}_{i}.h") for i in range(locals_))
        keep = remote or not locals_
        if large:
            path = self.journal / journal.BODIES / qid
            path.write_bytes(body)
            size, crc = journal.file_crc(str(path))
            entry = Entry(0, qid, env.to_json(), targets, b"", str(path), size, crc, keep)
        else:
            entry = Entry(0, qid, env.to_json(), targets, body, keep=keep)
        self.faults.left = crash
        try:
            raw = self.writer.run([mw.Job(1, mw.ACCEPT, entry=entry)])
        except Crash:
            self.maybe.add(qid)
            self._crashed()
            return
        self.faults.left = None
        if mw._STATUS.unpack_from(raw, mw._ANSWER.size)[0] != 1:
            return  # not durable: refused
        self.acked[qid] = [os.path.join(t.box, "new", t.name) for t in targets]
        if keep:
            self.held.add(qid)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), park=st.booleans(), crash=st.none() | st.integers(0, 8))
    def leave_the_journal(self, data: st.DataObject, park: bool, crash: int | None) -> None:
        qid = data.draw(st.sampled_from(sorted(self.held)))
        if qid in self.parked:
            return
        self.faults.left = crash
        try:
            if park:
                job = mw.Job(1, mw.PARK, queue_id=qid, envelope=b'{"parked": true}')
            else:
                job = mw.Job(1, mw.RELEASE, queue_id=qid)
            self.writer.run([job])
        except Crash:
            self.maybe_gone.add(qid)
            self._crashed()
            return
        self.faults.left = None
        if park:
            self.parked.add(qid)
        else:
            self.held.discard(qid)

    @rule(crash=st.none() | st.integers(0, 6))
    def sync(self, crash: int | None) -> None:
        self.faults.left = crash
        try:
            self.writer.syncer.run_now()  # type: ignore[attr-defined]
        except Crash:
            self._crashed()
            return
        self.faults.left = None

    @rule()
    def kill(self) -> None:
        self._crashed()

    def _crashed(self) -> None:
        """kill -9 of the writer: its descriptors close (the flock goes), a new one recovers."""
        self.faults.left = None
        if self.writer.segment is not None:
            os.close(self.writer.segment.fd)
        for kept in self.writer._kept.values():
            with contextlib.suppress(OSError):
                os.close(kept.segment.fd)
        self.writer._flushers.shutdown()
        self.writer = self._start()
        # Recovery parked everything the queue held.
        store = DeferredStore(self.root / "queue")
        for qid in list(self.held):
            if store.has(qid):
                self.parked.add(qid)
            elif qid in self.maybe_gone:
                self.held.discard(qid)  # its release was written before the crash
        self.maybe_gone.clear()

    # -- what must hold -------------------------------------------------------------------

    @invariant()
    def every_acknowledged_copy_is_there_once(self) -> None:
        for _qid, paths in self.acked.items():
            for path in paths:
                assert os.path.exists(path), path
        for box in (self.root / "mail").glob("u*"):
            names = [n for sub in ("new", "cur") for n in os.listdir(box / sub)]
            assert len(names) == len(set(names))

    @invariant()
    def what_the_queue_holds_is_parked_or_in_the_journal(self) -> None:
        store = DeferredStore(self.root / "queue")
        live = set(self.writer._kept)
        for qid in self.held:
            assert qid in live or store.has(qid) or qid in self.maybe_gone, qid
        for qid in store.ids():
            assert qid in self.held or qid in self.maybe or qid in self.acked, qid
        for qid in self.parked & self.held:
            assert store.has(qid)


@pytest.fixture
def machine_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    QueueMachine.monkeypatch = monkeypatch


def test_queue_machine(machine_patch: None) -> None:
    QueueMachine.TestCase.settings = settings(
        max_examples=int(os.environ.get("POSTROOM_STATEFUL_EXAMPLES", "60")),
        stateful_step_count=25,
        deadline=None,
    )
    QueueMachine.TestCase().runTest()
