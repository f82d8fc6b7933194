"""The queue's journal: one append and one ``fdatasync`` make a batch of messages durable.

Every accepted message, whatever its recipients and size, is one ACCEPT record: its queue id,
its envelope (JSON), the local copies to make now (Maildir, file name) and its octets, or,
for a large message, the name, size and CRC-32 of the *body file* the server streamed it into
(``bodies/``; flushed beside the journal, and later linked into each Maildir: written once).
The writer appends a batch of records and flushes once: that is what the 250 stands on. It
then publishes each copy into ``new/`` (no flush: mail is visible before its 250 goes out),
writes a *settled* mark (no flush) and answers. The :class:`Syncer` thread flushes the
published copies in bulk, once a second, with one ``syncfs`` per file system, then records
*synced up to seq N*; a full segment whose records are all synced is deleted.

A message with recipients left (remote ones, a copy that failed) is *kept* (a flag of its
record): its segment stays until a RELEASED record says the queue is done with it, either
because every recipient was done at the first attempt or because the message was *parked* in
the deferred store (:mod:`postroom.storage.local.deferred`) to wait for a retry. So segments
live seconds, however long some mail waits.

Recovery (:func:`recover`, at the writer's start, before it answers anything) replays each
orphaned segment, i.e. one no living writer holds the ``flock`` of:

* after a crash of the server (same boot: the page cache survived), a settled copy is done;
  an unsettled one is published unless its file is in ``new/`` or ``cur/`` already (the
  crash came between the link and the mark), so nothing is lost and nothing doubled;
* after a power loss (another boot id), nothing that was not synced can be trusted: each copy
  after the last synced mark is compared with its record, and written again if it differs or
  is missing (a copy fetched and deleted within that last second comes back: a duplicate is
  the safe side); a body file whose CRC differs was never flushed, so never acknowledged;
* a kept entry not released is parked, unless it was parked already, with the envelope of
  its last STATE record if it has one (a state the runner stored during the first attempt).

Records: ``<BQI`` kind, payload length, CRC-32 of the payload, then the payload. A torn
record ends the segment: nothing after it was ever acknowledged (an append is acknowledged
only after the ``fdatasync`` that also made every earlier byte durable). A bad record with
valid ones after it is damage, not a crash: the segment is replayed up to it, then set aside
in ``queue/corrupt/`` and reported (what follows is the admin's to look at).
docs/durability.md tells the whole story.

Why by hand: no library offers a write-ahead log with this shape (group commit, a publication
step into Maildirs, recovery by comparison); sqlite's WAL would add a second flush per commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field

from postroom.storage.local import files, maildir
from postroom.storage.local.deferred import DeferredStore

_RECORD = struct.Struct("<BQI")  # kind, payload length, crc32(payload)
_ACCEPT = struct.Struct("<QBHIIQII")  # seq, flags, targets, id/envelope/body lengths, file
_TARGET = struct.Struct("<IHH")  # recipient index, lengths of the Maildir path and file name
_SEQ = struct.Struct("<Q")
_MARK = struct.Struct("<QI")  # seq, target index

START, ACCEPT, SETTLED, SYNCED, RELEASED, KEPT, STATE = 1, 2, 3, 4, 5, 6, 7  # 0: zeros ahead
KEEP, IN_FILE = 1, 2  # ACCEPT flags
SUFFIX = ".journal"
REFUSED = ".refused"  # queue ids a writer died with, answered 452: never to be replayed
BODIES = "bodies"  # the journal's subdirectory for messages too large to go in a record
SEGMENT_SIZE = 16 << 20  # a segment past this size makes way for a new one
RESERVE = 1 << 20  # zeros written ahead of the records


@dataclass(frozen=True, slots=True)
class Target:
    """Where one copy goes: the recipient's index in the envelope, the Maildir, and the file
    name in ``new/``."""

    index: int
    box: str
    name: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted message: its envelope (JSON), the copies made at once, and its octets,
    either here (``body``) or in a file of the journal directory (``body_file``, of
    ``file_size`` octets whose CRC-32 is ``file_crc``). ``keep``: the queue holds the message
    for its runner until a RELEASED record (it has recipients not done at once)."""

    seq: int
    queue_id: str
    envelope: bytes
    targets: tuple[Target, ...]
    body: bytes = b""
    body_file: str = ""
    file_size: int = 0
    file_crc: int = 0
    keep: bool = False


def _record(kind: int, parts: Sequence[bytes]) -> list[bytes]:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [_RECORD.pack(kind, sum(len(p) for p in parts), crc), *parts]


def encode_entry(entry: Entry) -> list[bytes]:
    """An ACCEPT record; the body is not copied."""
    return _record(ACCEPT, entry_parts(entry))


def entry_parts(entry: Entry) -> list[bytes]:
    """An ACCEPT record's payload, in parts (no CRC: the server sends this to its writer,
    which makes the record, with its own sequence number, and its CRC)."""
    qid, body = entry.queue_id.encode(), entry.body
    if entry.body_file:
        body = os.fsencode(entry.body_file)
    flags = (KEEP if entry.keep else 0) | (IN_FILE if entry.body_file else 0)
    parts = [
        _ACCEPT.pack(
            entry.seq,
            flags,
            len(entry.targets),
            len(qid),
            len(entry.envelope),
            len(body),
            entry.file_size,
            entry.file_crc,
        )
    ]
    for t in entry.targets:
        box, name = os.fsencode(t.box), os.fsencode(t.name)
        parts += [_TARGET.pack(t.index, len(box), len(name)), box, name]
    parts += [qid, entry.envelope, body]
    return parts


def encode_settled(marks: Iterable[tuple[int, int]]) -> list[bytes]:
    return _record(SETTLED, [b"".join(_MARK.pack(seq, index) for seq, index in marks)])


def encode_released(seqs: Iterable[int]) -> list[bytes]:
    return _record(RELEASED, [b"".join(_SEQ.pack(seq) for seq in seqs)])


def encode_kept(seqs: Iterable[int]) -> list[bytes]:
    """Entries accepted as not kept whose copies failed: the queue holds them after all."""
    return _record(KEPT, [b"".join(_SEQ.pack(seq) for seq in seqs)])


def encode_state(seq: int, envelope: bytes) -> list[bytes]:
    """A kept entry's newer envelope (JSON), stored during an attempt: parked with it."""
    return _record(STATE, [_SEQ.pack(seq), envelope])


def encode_synced(seq: int) -> list[bytes]:
    return _record(SYNCED, [_SEQ.pack(seq)])


def encode_start(boot: str) -> list[bytes]:
    return _record(START, [boot.encode()])


@dataclass
class Contents:
    """What a segment says: read by :func:`parse`."""

    boot: str = ""
    entries: list[Entry] = field(default_factory=list)
    settled: set[tuple[int, int]] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    kept: set[int] = field(default_factory=set)  # KEPT marks
    states: dict[int, bytes] = field(default_factory=dict)  # the last STATE of each entry
    synced: int = 0
    end: int = 0  # where the valid records end
    # Valid records follow the first bad one: not a torn last append but damage (a bad
    # block, a flipped bit); what follows it is not replayed, and the segment is kept aside.
    damaged: bool = False

    def live(self) -> list[Entry]:
        """The entries the queue still holds (kept and not released), each with its last
        envelope."""
        states = self.states
        return [
            dataclasses.replace(e, envelope=states[e.seq]) if e.seq in states else e
            for e in self.entries
            if self.held(e)
        ]

    def held(self, entry: Entry) -> bool:
        return (entry.keep or entry.seq in self.kept) and entry.seq not in self.released


def parse(data: bytes) -> Contents:
    """The records of a segment, up to the first torn or corrupt one (``damaged`` if valid
    records follow it)."""
    out = Contents()
    pos, view = 0, memoryview(data)
    while len(data) - pos >= _RECORD.size:
        kind, length, crc = _RECORD.unpack_from(data, pos)
        start, stop = pos + _RECORD.size, pos + _RECORD.size + length
        if stop > len(data) or zlib.crc32(view[start:stop]) != crc:
            break
        try:
            take(out, kind, view[start:stop])
        except (struct.error, ValueError):  # a record that lies about its own layout
            break
        pos = out.end = stop
    else:
        return out  # read to the end
    out.damaged = _record_after(data, view, pos + 1)
    return out


_KIND = re.compile(rb"[\x01-\x07]")


def _record_after(data: bytes, view: memoryview, pos: int) -> bool:
    """Whether a valid record (kind, length within the file, CRC) starts at or after ``pos``.
    An append is cut off when it fails and nothing is written after a torn one, so one can
    only come after a bad record by damage. (A random header almost never passes: its
    eight-octet length must fit the file.)"""
    for m in _KIND.finditer(data, pos):
        at = m.start()
        if len(data) - at < _RECORD.size:
            return False
        _kind, length, crc = _RECORD.unpack_from(data, at)
        stop = at + _RECORD.size + length
        if stop <= len(data) and zlib.crc32(view[at + _RECORD.size : stop]) == crc:
            return True
    return False


def take(out: Contents, kind: int, payload: memoryview) -> None:
    if kind == START:
        out.boot = bytes(payload).decode()
    elif kind == ACCEPT:
        seq, flags, count, qid_len, env_len, body_len, size, crc = _ACCEPT.unpack_from(payload)
        pos, targets = _ACCEPT.size, []
        for _ in range(count):
            index, box_len, name_len = _TARGET.unpack_from(payload, pos)
            pos += _TARGET.size
            box = os.fsdecode(bytes(payload[pos : pos + box_len]))
            name = os.fsdecode(bytes(payload[pos + box_len : pos + box_len + name_len]))
            targets.append(Target(index, box, name))
            pos += box_len + name_len
        if len(payload) - pos != qid_len + env_len + body_len:
            raise ValueError("lengths")
        qid = bytes(payload[pos : pos + qid_len]).decode("ascii")
        envelope = bytes(payload[pos + qid_len : pos + qid_len + env_len])
        body = bytes(payload[pos + qid_len + env_len :])
        in_file = bool(flags & IN_FILE)
        out.entries.append(
            Entry(
                seq,
                qid,
                envelope,
                tuple(targets),
                b"" if in_file else body,
                os.fsdecode(body) if in_file else "",
                size,
                crc,
                bool(flags & KEEP),
            )
        )
    elif kind == SETTLED:
        if len(payload) % _MARK.size:
            raise ValueError("marks")
        out.settled.update(_MARK.iter_unpack(payload))
    elif kind in (RELEASED, KEPT):
        if len(payload) % _SEQ.size:
            raise ValueError("seqs")
        marks = out.released if kind == RELEASED else out.kept
        marks.update(seq for (seq,) in _SEQ.iter_unpack(payload))
    elif kind == STATE:
        (seq,) = _SEQ.unpack_from(payload)
        out.states[seq] = bytes(payload[_SEQ.size :])
    elif kind == SYNCED:
        (out.synced,) = _SEQ.unpack(payload)
    else:
        raise ValueError("kind")


def file_crc(path: str) -> tuple[int, int]:
    """The size and CRC-32 of a body file."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def boot_id() -> str:
    """This boot of the machine: the page cache of another boot is gone."""
    try:
        # Bytes, decoded without a codec lookup: the writer may no longer be able to
        # import one once it has dropped root.
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip().decode()
    except OSError:
        return ""  # unknown: recovery then trusts nothing it has not compared


class Segment:
    """One journal file, ``flock``\\ ed by the writer that appends to it.

    Zeros are written ahead of the records, a MiB at a time: an append then overwrites
    blocks the file has, and its ``fdatasync`` writes the data alone, not the inode too
    (a grown file needs its new size on disk). Reading stops at the zeros."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd
        self.size = 0  # where the records end (the file offset)
        self._reserved = 0  # where the zeros end
        self.last_seq = 0  # the newest ACCEPT in it
        self.synced = 0  # every record up to this seq is published and on disk
        self.retired = False  # no longer appended to: deleted once synced
        self.broken = False  # a flush failed: never marked synced, kept for recovery
        self.kept: set[int] = set()  # entries the queue holds: the segment stays for them
        self.removed = False
        self._lock = threading.Lock()  # the writer and the syncer both append

    @classmethod
    def create(cls, directory: str, boot: str) -> Segment:
        while True:
            path = os.path.join(directory, f"{time.time_ns()}.{os.getpid()}{SUFFIX}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if _lock(fd) and _is(path, fd):  # not taken for an orphan meanwhile
                break
            os.close(fd)
        segment = cls(path, fd)
        try:
            segment.append(encode_start(boot), sync=True)
            files.fsync_dir(directory)
        except OSError:  # a full disk: no file and no descriptor left behind for each try
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        return segment

    def append(self, parts: Sequence[bytes], sync: bool) -> None:
        """Append records; with ``sync``, return once they are on disk. A failed write is
        cut off again, so that the segment stays readable to its end."""
        size = sum(len(p) for p in parts)
        with self._lock:
            end = self.size + size
            try:
                if end > self._reserved and size < RESERVE:  # a large record just grows it
                    reserved = end + RESERVE
                    os.pwrite(self.fd, bytes(reserved - self._reserved), self._reserved)
                    self._reserved = reserved
                files.write_all(self.fd, parts)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.size)
                    os.lseek(self.fd, self.size, os.SEEK_SET)
                self._reserved = self.size
                raise
            self.size, self._reserved = end, max(self._reserved, end)
        if sync:
            os.fdatasync(self.fd)

    @property
    def done(self) -> bool:
        """Retired, every record synced, and no entry held by the queue: no longer needed."""
        return self.retired and self.synced >= self.last_seq and not self.kept

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            os.unlink(self.path)
            os.close(self.fd)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


# -- recovery -----------------------------------------------------------------------------------


def write_refused(directory: str, queue_ids: Iterable[str]) -> None:
    """For the server, when its writer died with accepts unanswered, before it answers them
    452: their queue ids, durably, for whoever replays that writer's journal."""
    name = f"{os.getpid()}.{time.time_ns()}{REFUSED}"
    fd = os.open(os.path.join(directory, f".{name}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        files.write_all(fd, ["".join(f"{q}\n" for q in queue_ids).encode()])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(os.path.join(directory, f".{name}"), os.path.join(directory, name))
    files.fsync_dir(directory)


def _read_refused(directory: str) -> tuple[set[str], list[str]]:
    """The queue ids of every refusal file in ``directory``, and the files."""
    ids: set[str] = set()
    paths = []
    for name in os.listdir(directory):
        if name.endswith(REFUSED) and not name.startswith("."):
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
                ids.update(line.strip() for line in f if line.strip())
                paths.append(path)
    return ids, paths


def recover(
    directory: str, boot: str, clean_bodies: bool = False, drop_refusals: bool = True
) -> int:
    """Replay every segment in ``directory`` that no living writer holds, then delete it;
    the number of copies written. Kept entries are parked in the deferred store (``queue/``
    beside ``directory``). A segment that cannot be replayed whole (a full disk) is kept for
    the next start, with marks of what this replay did (see :class:`_Marks`). With
    ``clean_bodies`` (the server's start, before any worker writes), body files that no
    segment names are removed: left by a message that was never acknowledged. Messages
    named by a refusal file (:func:`write_refused`) are dropped, and any copy of them still
    unread in ``new/`` taken back; the files go once every segment was replayed (unless not
    ``drop_refusals``: a replay in a running server, beside which a new writer may be about
    to read them for the segment of one that died)."""
    written = 0
    store = DeferredStore(os.path.join(os.path.dirname(directory) or ".", "queue"))
    named: set[str] = set()
    refused, refusals = _read_refused(directory)
    kept = False
    for name in sorted(os.listdir(directory)):
        if not name.endswith(SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # replayed by another writer meanwhile
            continue
        except OSError as exc:  # not ours to open (left by a run as another user)
            warn(f"{path}: kept for the next start: {exc}")
            kept = True
            continue
        contents: Contents | None = None
        try:
            # Locked before it is read: another replay that held it meanwhile (and was cut
            # short) may have added marks, which a read made before would not see.
            mine = _lock(fd) and _is(path, fd)
            if not mine and not clean_bodies:
                continue  # a living writer's
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            contents = parse(data)
            if not mine:  # a living writer's: read for the body files it names
                named.update(e.body_file for e in contents.entries if e.body_file)
                continue
            # Zeros after the records (a writer writes them ahead): the replay marks there
            # what it did, for the next one should this one be cut short (a full disk).
            marks = _Marks(fd, contents.end) if not data[contents.end :].strip(b"\0") else None
            copies, bodies = _replay(contents, boot, store, refused, marks)
            written += copies
            # The copies made since the last synced mark may be in the page cache alone (a
            # crash, not a power loss): flushed before the record of them goes.
            _flush(
                {t.box for e in contents.entries if e.seq > contents.synced for t in e.targets}
                | {directory}
            )
            for body in bodies:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(body)
            if contents.damaged:
                _set_aside(path, store, contents.end)
            else:
                os.unlink(path)
        except OSError as exc:
            warn(f"{path}: kept for the next start: {exc}")
            if contents is not None:
                named.update(e.body_file for e in contents.entries if e.body_file)
            kept = True
        finally:
            os.close(fd)
    if not kept and drop_refusals:  # (a living writer's segment holds none: its dead one's)
        for path in refusals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    bodies_dir = os.path.join(directory, BODIES)
    files.make_dirs(bodies_dir)
    if clean_bodies:
        for name in os.listdir(bodies_dir):
            path = os.path.join(bodies_dir, name)
            if path not in named:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return written


class _Marks:
    """Records a replay appends to the segment it replays, over the zeros after its records,
    so that the next replay, should this one be cut short (a full disk), does not do again
    what it did: a copy made (SETTLED), which its reader may have fetched and deleted since,
    and a message parked (RELEASED, written once the park is durable), which the runner may
    have delivered and removed since. Not flushed: a SETTLED mark is written only for an
    entry no synced mark covers, so it is trusted within this boot alone (the page cache
    that holds it holds the copy too); after a power loss each copy is compared again."""

    def __init__(self, fd: int, end: int) -> None:
        self.fd, self.end = fd, end

    def settle(self, seq: int, indexes: Iterable[int]) -> bool:
        return self._add(encode_settled([(seq, index) for index in indexes]))

    def release(self, seq: int) -> bool:
        return self._add(encode_released([seq]))

    def _add(self, record: list[bytes]) -> bool:
        """False if the segment takes no record (a short write leaves a torn one: the end of
        the segment, where a next mark would not be read)."""
        data = b"".join(record)
        try:
            written = os.pwrite(self.fd, data, self.end)
        except OSError:
            return False
        self.end += written
        return written == len(data)


def _flush(directories: set[str]) -> None:
    """One ``syncfs`` for each file system among ``directories`` (those that exist)."""
    devices: dict[int, str] = {}
    for directory in directories:
        with contextlib.suppress(OSError):
            devices.setdefault(os.stat(directory).st_dev, directory)
    for directory in devices.values():
        syncfs(directory)


def _set_aside(path: str, store: DeferredStore, end: int) -> None:
    """Keep a damaged segment for the admin (``queue/corrupt/``), replayed as far as it could
    be: the messages whose records follow the damage are not delivered."""
    dest = os.path.join(str(store.root), "corrupt", os.path.basename(path))
    try:
        os.replace(path, dest)
    except OSError as exc:
        warn(f"{path}: damaged at octet {end}, and could not be set aside: {exc}")
        return
    warn(
        f"{path}: damaged at octet {end}; records follow it that were not replayed (their "
        f"messages are not delivered): set aside as {dest}"
    )


def _replay(
    contents: Contents,
    boot: str,
    store: DeferredStore,
    refused: Container[str] = (),
    marks: _Marks | None = None,
) -> tuple[int, list[str]]:
    """Publish what may be missing and park what the queue still held; the copies written
    and the body files no longer needed. ``marks`` records what was done in the segment."""
    same_boot = bool(boot) and contents.boot == boot
    written, dirs, bodies = 0, set(), []
    for entry in contents.entries:
        copies = entry.seq > contents.synced
        park = contents.held(entry)
        if park and store.has(entry.queue_id):
            park = False  # parked before the crash (the RELEASED record was not written)
        if entry.body_file:
            bodies.append(entry.body_file)
        if entry.queue_id in refused:  # answered 452: the client sends it again
            for target in entry.targets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(target.box, "new", target.name))
                    dirs.add(os.path.join(target.box, "new"))
            continue
        if not (copies or park):
            continue
        delivered: list[int] = []  # recipients whose copy is in place (kept entries)
        # Copies to publish: the target's place in the entry (what a SETTLED mark names), the
        # target, and a stale file.
        owed: list[tuple[int, Target, str | None]] = []
        for index, target in enumerate(entry.targets):
            # A settled mark is trusted across a power loss once a synced mark follows it:
            # the syncer flushed the copy before it wrote that mark (see Syncer).
            trusted = same_boot or entry.seq <= contents.synced
            settled = trusted and (entry.seq, index) in contents.settled
            if not park and (not copies or settled):
                delivered.append(target.index)  # (read if a failed copy parks it below)
                continue
            found = maildir.find(target.box, target.name)
            if (found is not None and (same_boot or _same(found, entry))) or settled:
                delivered.append(target.index)  # (settled but gone: read and deleted since)
            else:
                owed.append((index, target, found))
        if (owed or park) and entry.body_file and not _intact(entry, same_boot):
            warn(f"{entry.queue_id}: body file incomplete: never acknowledged, dropped")
            continue
        for index, target, found in owed:
            if found is not None:
                os.unlink(found)
            try:
                dirs.add(publish_copy(entry, target))
            except OSError as exc:  # parked below: the runner retries it from there
                warn(f"{entry.queue_id}: copy for {target.box}: {exc}")
                if not park and not store.has(entry.queue_id):
                    park = True  # else nothing would be left of it once the segment goes
                continue
            if marks is not None and copies and not marks.settle(entry.seq, [index]):
                warn(f"{entry.queue_id}: the journal takes no mark of what its replay did")
                marks = None
            delivered.append(target.index)
            written += 1
        if park:  # (an OSError here keeps the segment for the next start)
            store.park(
                _mark_delivered(contents.states.get(entry.seq, entry.envelope), delivered),
                entry.queue_id,
                None if entry.body_file else entry.body,
                entry.body_file,
            )
            if entry.body_file:
                bodies.remove(entry.body_file)
            # Parked: the queue owns it, its copies not made included (the runner makes
            # them); a later replay of this segment leaves it alone.
            owed_now = [i for i, t in enumerate(entry.targets) if t.index not in delivered]
            if marks is not None and not (
                (not copies or not owed_now or marks.settle(entry.seq, owed_now))
                and marks.release(entry.seq)
            ):
                warn(f"{entry.queue_id}: the journal takes no mark of what its replay did")
                marks = None
    for directory in dirs:
        files.fsync_dir(directory)
    if written:
        noun = "copy" if written == 1 else "copies"
        warn(f"{written} {noun} written again from the journal after a crash")
    return written, bodies


def _mark_delivered(envelope: bytes, indexes: list[int]) -> bytes:
    """The envelope of a kept entry with the copies made at acceptance marked delivered (the
    record was written before they were made)."""
    data = json.loads(envelope)
    for i in indexes:
        data["recipients"][i]["status"] = "delivered"
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def publish_copy(entry: Entry, target: Target) -> str:
    """Put one copy of ``entry`` into ``new/`` (a link to its body file, or the body written
    out) and fsync it; the directory, for the caller to fsync."""
    new = os.path.join(target.box, "new")
    if entry.body_file:
        with contextlib.suppress(FileExistsError):
            maildir.link_copy(entry.body_file, target.box, target.name)
        return new
    fd = maildir.publish(target.box, target.name, (entry.body,))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return new


def _intact(entry: Entry, same_boot: bool) -> bool:
    """Whether the body file holds what was acknowledged. After a crash the page cache is
    the truth and the server wrote the file whole before the record; after a power loss only
    its CRC can tell."""
    try:
        if same_boot:
            return os.stat(entry.body_file).st_size == entry.file_size
        return file_crc(entry.body_file) == (entry.file_size, entry.file_crc)
    except OSError:
        return False


def _same(path: str, entry: Entry) -> bool:
    try:
        if entry.body_file:
            if os.path.samefile(path, entry.body_file):
                return True
            return file_crc(path) == (entry.file_size, entry.file_crc)
        with open(path, "rb") as f:
            return f.read(len(entry.body) + 1) == entry.body
    except OSError:
        return False


# -- the syncer ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """Published copies to be made durable: the ``new/`` directories they went to, and the
    segment seq they complete."""

    segment: Segment
    seq: int
    dirs: set[str]
    unlink: list[str] = field(default_factory=list)  # body files no longer needed once synced


class Syncer:
    """The thread that makes published copies durable and retires journal segments.

    One ``syncfs`` per file system flushes every copy published since the last round, and
    their directories, in one go: a per-file ``fsync`` would cost a device flush per copy,
    which is what the journal is there to avoid. (It also flushes whatever else is dirty on
    that file system; this thread is not on the path of any reply.)"""

    # Copies are flushed in bulk, at most this often: the journal holds them meanwhile, and
    # a copy fetched and deleted before the flush (or the kernel's own writeback) never costs
    # the disk anything. A power loss makes the next start compare this much mail.
    DELAY = 1.0

    def __init__(self) -> None:
        self._batches: list[Batch] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="journal-syncer", daemon=True)
        self._thread.start()

    def add(self, batch: Batch) -> None:
        with self._cond:
            last = self._batches[-1] if self._batches else None
            if last is None:  # the thread waits for a first batch; later ones wait their turn
                self._cond.notify_all()
            if last is not None and last.segment is batch.segment:  # one batch per segment
                last.seq = max(last.seq, batch.seq)
                last.dirs |= batch.dirs
                last.unlink += batch.unlink
            else:
                self._batches.append(batch)

    def stop(self) -> None:
        """Sync what was handed over, then end."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._batches or self._stopping)
                if not self._batches:
                    return
                self._cond.wait_for(lambda: self._stopping, timeout=self.DELAY)
                batches, self._batches = self._batches, []
            self._sync(batches)

    def _sync(self, batches: list[Batch]) -> None:
        devices: dict[int, str] = {}  # one directory on each file system written to
        for directory in {d for b in batches for d in b.dirs} | {
            os.path.dirname(b.segment.path) for b in batches
        }:
            with contextlib.suppress(OSError):
                devices.setdefault(os.stat(directory).st_dev, directory)
        for directory in devices.values():
            try:
                syncfs(directory)
            except OSError as exc:
                warn(f"syncfs of {directory} failed: {exc}")
                for b in batches:  # kept: replayed and compared at the next start
                    b.segment.broken = True
        for b in batches:  # one per segment (see add), oldest first
            if b.segment.broken:
                continue
            try:
                if not b.segment.removed:
                    b.segment.append(encode_synced(b.seq), sync=True)
                    b.segment.synced = b.seq
                for body in b.unlink:  # linked into their Maildirs durably, or released
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(body)
                if b.segment.done:
                    b.segment.remove()
            except OSError as exc:
                warn(f"{b.segment.path}: {exc}")


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(directory: str) -> None:
    """Flush everything dirty on the file system of ``directory`` (syncfs(2); with no
    syncfs in the C library, sync(2), which flushes every file system)."""
    func = getattr(_libc, "syncfs", None)
    if func is None:
        os.sync()
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if func(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def warn(text: str) -> None:
    """A warning line of the writer process, in the server's ``log_format`` (which the
    worker passes in the environment: the writer reads no config, see logs.setup)."""
    shape, _, host = os.environ.get("POSTROOM_LOG_FORMAT", "text localhost").partition(" ")
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    if shape == "json":
        line = json.dumps(
            {"ts": stamp, "level": "warning", "event": "log", "logger": "postroom.maildir-writer",
             "message": text}, ensure_ascii=False,
        )  # fmt: skip
    else:
        line = f"{stamp} {host} postroom/maildir-writer[{os.getpid()}]: warning: {text}"
    print(line, file=sys.stderr, flush=True)
