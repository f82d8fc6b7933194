"""The durable spool: accepted messages and their per-recipient delivery state.

Layout under ``{data_dir}/queue/``::

    tmp/ID         being written; never read, removed at start-up
    msg/ID         a complete message: the message octets, then the envelope as JSON, then a
                   fixed 27-octet footer ``\\nPOSTROOM-QUEUE1 <json length>\\n``. A file without
                   a valid footer is recognisably broken and is moved to ``corrupt/``.
    state/ID.json  mutable delivery state (attempts, next attempt, per-recipient status);
                   replaced atomically (write, fsync, rename). Absent until the first deferral.
    corrupt/       files that could not be read, kept for the admin

A message counts as accepted only once ``msg/ID`` is fsync'ed and the directory entry is too:
the file is fsync'ed in a worker thread and renamed, and concurrent sessions share one fsync of
``msg/`` (group commit, :class:`GroupSync`), so durability costs little throughput.

Only this module and ``storage/`` touch the disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from postroom.blocking import BlockingPool
from postroom.errors import QueueError, TemporaryStorageError
from postroom.storage.local import files
from postroom.storage.local.files import write_all

Status = Literal["queued", "deferred", "delivered", "bounced"]
FOOTER_MAGIC = b"\nPOSTROOM-QUEUE1 "
FOOTER_LEN = len(FOOTER_MAGIC) + 11  # ten digits and a newline
SPILL_THRESHOLD = 1 << 20


_ID_SEQUENCE = itertools.count()


def new_queue_id(now: float | None = None) -> str:
    """Sortable, unique id: microseconds since the epoch, the process id, a sequence number.

    The process id keeps the ids of forked workers apart: a sequence alone is copied by
    ``fork`` and two workers would make the same id in the same microsecond (and the same
    Maildir file name, one message overwriting the other). A pid is reused only after its
    process has exited, and a process makes fewer than 65,536 ids in one microsecond.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014X}{os.getpid() & 0xFFFFFF:06X}{next(_ID_SEQUENCE) & 0xFFFF:04X}"


def _check_id(queue_id: str) -> None:
    """QueueError unless ``queue_id`` could be one of :func:`new_queue_id`'s (letters and
    digits only, so never a path such as ``../accounts.sqlite``)."""
    if not (queue_id.isascii() and queue_id.isalnum()):
        raise QueueError(f"no such message {queue_id}")


@dataclass
class Recipient:
    """One envelope recipient and where its delivery stands."""

    address: str
    original: str | None = None  # the RCPT address when an alias was expanded (or ORCPT)
    orcpt: str | None = None
    notify: list[str] | None = None
    status: Status = "queued"
    last_error: str | None = None
    remote_mta: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("delivered", "bounced")


@dataclass
class Envelope:
    """What the queue knows about a message besides its octets."""

    id: str
    sender: str  # "" is the null reverse-path
    recipients: list[Recipient]
    created: float
    size: int = 0
    client_ip: str = ""
    helo: str = ""
    auth_user: str | None = None
    envid: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    is_bounce: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)

    def state_json(self) -> bytes:
        return json.dumps(
            {
                "attempts": self.attempts,
                "next_attempt": self.next_attempt,
                "last_attempt": self.last_attempt,
                "recipients": [
                    {"status": r.status, "last_error": r.last_error, "remote_mta": r.remote_mta}
                    for r in self.recipients
                ],
            },
            separators=(",", ":"),
        ).encode()

    def apply_state(self, raw: bytes) -> None:
        data = json.loads(raw)
        self.attempts = int(data["attempts"])
        self.next_attempt = float(data["next_attempt"])
        self.last_attempt = data.get("last_attempt")
        for rcpt, st in zip(self.recipients, data["recipients"], strict=True):
            rcpt.status = st["status"]
            rcpt.last_error = st["last_error"]
            rcpt.remote_mta = st.get("remote_mta")


class GroupSync:
    """Shares one directory fsync between everybody who renamed into it meanwhile.

    Each caller takes a ticket after its rename. A sync that *started* after a ticket was taken
    covers it; so a caller whose ticket is already covered returns without a syscall of its own.
    """

    def __init__(self, path: Path, io: BlockingPool) -> None:
        self.path = path
        self._io = io
        self._lock = asyncio.Lock()
        self._issued = 0
        self._synced = 0

    async def sync(self) -> None:
        self._issued += 1
        ticket = self._issued
        async with self._lock:
            if self._synced >= ticket:
                return
            target = self._issued
            await self._io.run(files.fsync_dir, self.path)
            self._synced = target


class SpoolWriter:
    """Collects one message's octets; small ones in memory, large ones in ``tmp/``."""

    def __init__(
        self, store: QueueStore, queue_id: str, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.store = store
        self.queue_id = queue_id
        self.size = 0
        self._parts: list[bytes] = []
        self._fd: int | None = None
        self._make_prefix = make_prefix
        self._prefix_len = 0
        # A write to tmp/ failed (disk full): the rest of the data is read and dropped, and
        # commit() reports it, so that the client gets its 452 after the data as usual.
        self._failed: OSError | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._failed is not None:
            return
        try:
            if self._fd is not None:
                write_all(self._fd, (data,))
                return
            self._parts.append(data)
            if self.size > SPILL_THRESHOLD:
                self._take_prefix()
                self._fd = os.open(
                    self.store.tmp_dir / self.queue_id,
                    os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                    0o600,
                )
                write_all(self._fd, self._parts)
                self._parts.clear()
        except OSError as exc:
            self._failed = exc
            self.abort()

    def _take_prefix(self) -> None:
        """Put the trace headers in front, once the header section (or 1 MiB) has been seen."""
        if self._make_prefix is None:
            return
        body = b"".join(self._parts)
        prefix = self._make_prefix(body)
        self._make_prefix = None
        self._prefix_len = len(prefix)
        self._parts = [prefix, body]
        self.size += len(prefix)

    async def rewrite(self, convert: Callable[[bytes], bytes]) -> None:
        """Replace the client's message by ``convert(message)`` (the trace headers still go on
        top); a spilled message is read back, converted and rewritten in a worker thread."""
        if self._failed is not None:
            return
        if self._fd is None:
            data = b"".join(self._parts)
            trace = data[: self._prefix_len]
            self._parts = [trace + convert(data[self._prefix_len :])]
            self.size = len(self._parts[0])
            return
        try:
            await self.store.io.run(self._rewrite_file, convert)
        except OSError as exc:
            self._failed = exc
            self.abort()

    def _rewrite_file(self, convert: Callable[[bytes], bytes]) -> None:
        assert self._fd is not None
        data = os.pread(self._fd, self.size - self._prefix_len, self._prefix_len)
        new = convert(data)
        if new != data:
            os.ftruncate(self._fd, self._prefix_len)
            os.lseek(self._fd, self._prefix_len, os.SEEK_SET)
            write_all(self._fd, (new,))
            self.size = self._prefix_len + len(new)

    def head(self, limit: int) -> bytes:
        """The first ``limit`` octets of the client's message (enough for header checks)."""
        if self._failed is not None:
            return b""
        if self._fd is not None:
            return os.pread(self._fd, limit, self._prefix_len)
        # Join the pieces once and keep the result: the later joins then copy nothing.
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        whole = self._parts[0] if self._parts else b""
        return whole[self._prefix_len : self._prefix_len + limit]

    @property
    def in_memory(self) -> bool:
        return self._fd is None and self._failed is None

    def finish_in_memory(self) -> bytes:
        """The whole message (trace headers first) for a delivery that skips the spool."""
        self._take_prefix()
        data = b"".join(self._parts)
        self._parts = [data]
        return data

    def whole(self) -> bytes:
        """The whole message so far, trace headers first (read back when spilled to tmp/)."""
        if self._fd is None:
            return self.finish_in_memory()
        return os.pread(self._fd, self.size, 0)

    def replace(self, data: bytes) -> None:
        """Put ``data`` (a changed :meth:`whole`: signed, or with our auth results) in place."""
        self.size = len(data)
        if self._fd is None:
            self._parts = [data]
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.lseek(self._fd, 0, os.SEEK_END)  # the envelope goes after it

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            (self.store.tmp_dir / self.queue_id).unlink(missing_ok=True)
        self._parts.clear()

    def _finish(self, envelope: Envelope) -> None:
        """Runs in a worker thread: complete the file, fsync it, rename it into msg/."""
        tmp = self.store.tmp_dir / self.queue_id
        envelope.size = self.size
        meta = envelope.to_json()
        footer = FOOTER_MAGIC + b"%010d\n" % len(meta)
        try:
            if self._fd is None:
                self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                write_all(self._fd, [*self._parts, meta, footer])
            else:
                write_all(self._fd, (meta, footer))
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.rename(tmp, self.store.msg_dir / self.queue_id)
        except OSError as exc:
            self.abort()
            raise TemporaryStorageError(str(exc)) from exc

    async def commit(self, envelope: Envelope) -> None:
        """Make the message durable; only after this returns may the client get its 250."""
        if self._failed is not None:
            raise TemporaryStorageError(str(self._failed))
        if self._fd is None:
            self._take_prefix()
        await self.store.io.run(self._finish, envelope)
        try:
            await self.store.msg_sync.sync()
        except OSError as exc:
            raise TemporaryStorageError(str(exc)) from exc


@dataclass
class QueueStore:
    """The spool directory. Safe to use from the server and (read-mostly) from the CLI."""

    root: Path
    io: BlockingPool = field(default_factory=BlockingPool)

    def __post_init__(self) -> None:
        for sub in ("tmp", "msg", "state", "corrupt"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._msg_sync: GroupSync | None = None

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def msg_dir(self) -> Path:
        return self.root / "msg"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def msg_sync(self) -> GroupSync:
        if self._msg_sync is None:
            self._msg_sync = GroupSync(self.msg_dir, self.io)
        return self._msg_sync

    def writer(
        self, queue_id: str | None = None, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> SpoolWriter:
        return SpoolWriter(self, queue_id or new_queue_id(), make_prefix)

    async def add_message(self, sender: str, recipients: list[str], message: bytes) -> Envelope:
        """Queue a message made here (a DMARC report), trace header first; its envelope."""
        envelope = Envelope(
            id=new_queue_id(),
            sender=sender,
            recipients=[Recipient(r) for r in recipients],
            created=time.time(),
        )
        await self.add(envelope, message)
        return envelope

    async def add(self, envelope: Envelope, message: bytes) -> None:
        """Queue a message we made ourselves (a bounce) durably."""
        writer = self.writer(envelope.id)
        writer.write(message)
        await writer.commit(envelope)

    # -- reading -------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.msg_dir) if not n.startswith("."))

    def clean_tmp(self) -> int:
        """Remove half-written files left by a crash (never acknowledged), and the delivery
        states of messages whose removal a crash cut in two (:meth:`remove` unlinks the
        message first). Returns the count."""
        n = 0
        for name in os.listdir(self.tmp_dir):
            (self.tmp_dir / name).unlink(missing_ok=True)
            n += 1
        messages = set(os.listdir(self.msg_dir))
        for name in os.listdir(self.state_dir):
            if name.endswith(".json") and name[: -len(".json")] not in messages:
                (self.state_dir / name).unlink(missing_ok=True)
                n += 1
        return n

    def load(self, queue_id: str) -> Envelope:
        """The envelope with its current state; QueueError if missing or unreadable."""
        _check_id(queue_id)
        path = self.msg_dir / queue_id
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < FOOTER_LEN:
                    raise QueueError(f"{queue_id}: truncated queue file")
                fh.seek(size - FOOTER_LEN)
                footer = fh.read(FOOTER_LEN)
                if not footer.startswith(FOOTER_MAGIC) or not footer.endswith(b"\n"):
                    raise QueueError(f"{queue_id}: truncated queue file")
                meta_len = int(footer[len(FOOTER_MAGIC) : -1])
                fh.seek(size - FOOTER_LEN - meta_len)
                envelope = Envelope.from_json(fh.read(meta_len))
        except FileNotFoundError:
            raise QueueError(f"no such message {queue_id}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"{queue_id}: unreadable queue file: {exc}") from None
        try:
            envelope.apply_state((self.state_dir / f"{queue_id}.json").read_bytes())
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"{queue_id}: unreadable state file: {exc}") from None
        return envelope

    def message(self, envelope: Envelope) -> bytes:
        """The message octets (as received, with our Received header)."""
        with open(self.msg_dir / envelope.id, "rb") as fh:
            return fh.read(envelope.size)

    def message_head(self, envelope: Envelope, limit: int = 65536) -> bytes:
        with open(self.msg_dir / envelope.id, "rb") as fh:
            return fh.read(min(limit, envelope.size))

    def iter_envelopes(self) -> Iterator[Envelope | QueueError]:
        for qid in self.ids():
            try:
                yield self.load(qid)
            except QueueError as exc:
                yield exc

    def quarantine(self, queue_id: str) -> Path:
        """Move an unreadable queue file aside so it cannot crash-loop the runner."""
        dest = self.root / "corrupt" / queue_id
        os.replace(self.msg_dir / queue_id, dest)
        (self.state_dir / f"{queue_id}.json").unlink(missing_ok=True)
        return dest

    # -- changing ------------------------------------------------------------------------------

    def save_state(self, envelope: Envelope) -> None:
        """Durably replace the state file (blocking; call from a worker thread)."""
        path = self.state_dir / f"{envelope.id}.json"
        tmp = self.state_dir / f".{envelope.id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, (envelope.state_json(),))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        files.fsync_dir(self.state_dir)

    def forget_state(self, queue_id: str) -> None:
        """Remove the delivery state of a message that is gone (if it has any)."""
        _check_id(queue_id)
        (self.state_dir / f"{queue_id}.json").unlink(missing_ok=True)

    def remove(self, queue_id: str) -> None:
        """Forget a message whose every recipient is done (or that the admin deleted)."""
        _check_id(queue_id)  # an id from the CLI must not name a path
        try:
            os.unlink(self.msg_dir / queue_id)
        except FileNotFoundError:
            raise QueueError(f"no such message {queue_id}") from None
        (self.state_dir / f"{queue_id}.json").unlink(missing_ok=True)
