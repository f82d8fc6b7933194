"""Where messages wait for their next attempt: one file per message and one per state.

Every message enters the queue through the journal (:mod:`postroom.storage.local.journal`).
Most leave it at their first attempt; a message that must wait (a remote host said 4xx, a
Maildir could not be written) is *parked* here, so that journal segments stay short-lived and
are deleted within seconds whatever the queue holds. Layout under ``{data_dir}/queue/``::

    msg/ID         the stored message (LF line ends, the Return-Path line first); a journal
                   body file is renamed here, so a large message is not copied
    state/ID.json  the envelope with per-recipient state and the attempt history; replaced
                   atomically (write, fsync, rename, fsync the directory)
    corrupt/       what could not be read, kept for the admin

A message exists here iff ``msg/ID`` does: :meth:`DeferredStore.park` makes the state durable
before the message's name, and :meth:`DeferredStore.remove` unlinks the message first, so a
crash in either leaves at most a state file without its message, which start-up removes.
Parking is written durably before the journal entry is released, and recovery parks a kept
entry only if ``msg/ID`` is not there yet: a message is never parked twice nor lost between.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from postroom.errors import QueueError
from postroom.queue.envelope import Envelope, check_id, is_queue_id
from postroom.storage.local import files


class DeferredStore:
    """``queue/`` under ``data_dir``. Used by the writer child (parking), the primary worker's
    runner (state after each attempt) and the CLI."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        for sub in ("msg", "state", "corrupt"):
            files.make_dirs(self.root / sub)
        self.msg_dir = self.root / "msg"
        self.state_dir = self.root / "state"

    def msg_path(self, queue_id: str) -> str:
        check_id(queue_id)
        return str(self.msg_dir / queue_id)

    def has(self, queue_id: str) -> bool:
        """Is the message here? OSError when that cannot be told (``msg/`` unreadable for a
        while): taken for "no", a due message was dropped from the schedule in silence."""
        try:
            os.stat(self.msg_path(queue_id))
        except FileNotFoundError:
            return False
        return True

    # -- writing ---------------------------------------------------------------------------------

    def park(self, envelope: bytes, queue_id: str, body: bytes | None, body_file: str) -> None:
        """Store a message durably: its state, then the message (``body``, or ``body_file``
        renamed, which must be on the same file system). Blocking."""
        self._write_state(queue_id, envelope)
        dest = self.msg_path(queue_id)
        if body is not None:
            _replace(self.msg_dir / f".{queue_id}.tmp", dest, body)
        else:
            fd = os.open(body_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # written by the server: durable already, unless a crash replays
            finally:
                os.close(fd)
            os.replace(body_file, dest)
        files.fsync_dir(self.msg_dir)

    def save_state(self, envelope: Envelope) -> None:
        """Durably replace the state of a parked message (blocking). A message removed
        meanwhile (`queue delete` during its attempt) keeps no state: :meth:`remove` takes the
        message before the state, so one of the two unlinks always sees the new file."""
        self._write_state(envelope.id, envelope.to_json())
        if not self.has(envelope.id):
            (self.state_dir / f"{envelope.id}.json").unlink(missing_ok=True)

    def _write_state(self, queue_id: str, raw: bytes) -> None:
        check_id(queue_id)
        path = self.state_dir / f"{queue_id}.json"
        _replace(self.state_dir / f".{queue_id}.tmp", path, raw, self._due(raw))
        files.fsync_dir(self.state_dir)

    @staticmethod
    def _due(raw: bytes) -> float:
        """When a message with this state is due: its next attempt, or at once if it has had
        none (the state file's mtime says so, see :meth:`schedule`)."""
        data = json.loads(raw)
        return float(data["next_attempt"]) if data.get("attempts") else 0.0

    def remove(self, queue_id: str) -> None:
        """Forget a message (done, or deleted by the admin); QueueError if it is not here."""
        try:
            os.unlink(self.msg_path(queue_id))
        except FileNotFoundError:
            raise QueueError(f"no such message {queue_id}") from None
        # Durable: after a power loss a finished message must not come back and go again.
        files.fsync_dir(self.msg_dir)
        (self.state_dir / f"{queue_id}.json").unlink(missing_ok=True)

    def quarantine(self, queue_id: str) -> Path:
        """Move an unreadable message aside so it cannot crash-loop the runner: its state
        first (a message moved without it left a state that the next start removed as a
        crash's leftover), then the message. OSError if either cannot be moved."""
        corrupt = self.root / "corrupt"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.state_dir / f"{queue_id}.json", corrupt / f"{queue_id}.json")
        dest = corrupt / queue_id
        os.replace(self.msg_path(queue_id), dest)
        return dest

    def set_aside_strays(self) -> list[str]:
        """Start-up: move what ``msg/`` holds that is no queue id (a file put there by hand, a
        tool's) to ``corrupt/``; their names. Left there, every listing and every flush met
        one and failed."""
        moved = []
        for name in os.listdir(self.msg_dir):
            if not name.startswith(".") and not is_queue_id(name):
                with contextlib.suppress(OSError):
                    os.replace(self.msg_dir / name, self.root / "corrupt" / name)
                    moved.append(name)
        return moved

    def clean(self) -> int:
        """Start-up: remove what a crash cut in two (temporary files, states without their
        message). Returns the count."""
        n = 0
        messages = set(os.listdir(self.msg_dir))
        for directory in (self.msg_dir, self.state_dir):
            for name in os.listdir(directory):
                stale = name.startswith(".") or (
                    directory == self.state_dir and name.removesuffix(".json") not in messages
                )
                if stale:
                    (directory / name).unlink(missing_ok=True)
                    n += 1
        return n

    def schedule(self) -> Iterator[tuple[str, float]]:
        """(queue id, when it is due) of every message here, from the state files' mtimes
        alone: 100,000 messages are scheduled at start-up without reading one file. (A
        message whose mtime is wrong, after a restore say, is merely tried at another time;
        one whose state cannot be read is quarantined when it is due.)"""
        with os.scandir(self.msg_dir) as messages:
            ids = {e.name for e in messages if is_queue_id(e.name)}
        with os.scandir(self.state_dir) as states:
            for entry in states:
                qid = entry.name.removesuffix(".json")
                if qid in ids:
                    ids.discard(qid)
                    with contextlib.suppress(FileNotFoundError):
                        yield qid, entry.stat().st_mtime
        yield from ((qid, 0.0) for qid in ids)  # no state: due now, and quarantined then

    # -- reading ---------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """The queue ids of the messages here (a name that is none is no message: see
        :meth:`set_aside_strays`)."""
        return sorted(n for n in os.listdir(self.msg_dir) if is_queue_id(n))

    def load(self, queue_id: str) -> Envelope:
        """QueueError if missing or unreadable, or if the message file is not the size its
        state records (truncated or emptied: it would be sent as it is)."""
        try:
            st = os.stat(self.msg_path(queue_id))
        except FileNotFoundError:
            raise QueueError(f"no such message {queue_id}") from None
        try:
            raw = files.read_regular(self.state_dir / f"{queue_id}.json", follow_links=False)
        except FileNotFoundError:
            raise QueueError(f"{queue_id}: state file missing") from None
        except files.NotRegular as exc:  # the entry's own fault: a directory in its place, say
            raise QueueError(f"{queue_id}: state file unreadable: {exc}") from None
        # Any other OSError (no permission, for now perhaps; a bad block) is raised as it is:
        # not a reason to set the message aside (the runner tries it again later).
        try:
            envelope = Envelope.from_json(raw)
        except QueueError as exc:
            raise QueueError(f"{queue_id}: {exc}") from None
        if envelope.id != queue_id:  # (edited or damaged: it would be shown, not found)
            raise QueueError(f"{queue_id}: unreadable envelope: it names another id")
        if not stat.S_ISREG(st.st_mode):
            raise QueueError(f"{queue_id}: the message is not a regular file")
        stored = st.st_size
        if envelope.size and stored != envelope.size:  # (0: no size recorded)
            raise QueueError(
                f"{queue_id}: the message file holds {stored} octets, its state {envelope.size}"
            )
        return envelope

    def iter_envelopes(self) -> Iterator[Envelope | QueueError]:
        """Every message's envelope, or the QueueError of one that cannot be read; one that
        a running server finished while this listed them is no error, and is left out."""
        for qid in self.ids():
            try:
                yield self.load(qid)
            except QueueError as exc:
                if self.has(qid):
                    yield exc
            except OSError as exc:  # (no permission, say: the others are listed all the same)
                yield QueueError(f"{qid}: cannot be read: {exc.strerror or exc}")

    def read(self, queue_id: str, limit: int = -1) -> bytes:
        with open(self.msg_path(queue_id), "rb") as fh:
            return fh.read(limit)


def _replace(tmp: Path, dest: str | Path, data: bytes, due: float | None = None) -> None:
    """Write ``data`` over ``dest`` durably (the caller fsyncs the directory); a state file's
    mtime is set to when its message is due."""
    files.replace_durably(dest, data, tmp, due)
