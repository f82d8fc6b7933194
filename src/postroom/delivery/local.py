"""Local delivery: a queued message into each local recipient's Maildir.

Prepends ``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To``, and changes nothing else. The
Maildir file name is derived from the queue id and recipient index, so a delivery repeated after
a crash finds the earlier copy and does not deliver it twice. One worker-thread job writes an
unnamed file, fsyncs it and links it into ``new/``; ``new/`` is then fsync'ed once for all
deliveries that linked meanwhile (group commit), or by the job itself when it was alone.
"""

from __future__ import annotations

from pathlib import Path

from postroom.blocking import BlockingPool
from postroom.queue.store import Envelope, GroupSync
from postroom.storage import maildir

BOX_CACHE = 10_000


class LocalDelivery:
    """Writes into Maildirs under ``data_dir``; blocking work runs in the ``io`` threads."""

    def __init__(self, data_dir: Path, hostname: str, io: BlockingPool) -> None:
        self.data_dir = data_dir
        self.hostname = hostname
        self.io = io
        self._ensured: set[str] = set()  # Maildirs known to exist: no stat per delivery
        self._boxes: dict[str, str] = {}  # recipient key -> its Maildir, as a string
        self._syncs: dict[str, GroupSync] = {}  # Maildir -> the shared fsync of its new/
        self._in_flight = 0  # deliveries under way

    def _box(self, key: str) -> str:
        box = self._boxes.get(key)
        if box is None:
            if len(self._boxes) >= BOX_CACHE:
                self._boxes.clear()
                self._syncs.clear()
            box = self._boxes[key] = str(maildir.mailbox_path(self.data_dir, key))
        return box

    async def deliver(
        self,
        envelope: Envelope,
        index: int,
        key: str,
        message: bytes,
        check_duplicate: bool = False,
    ) -> None:
        """Deliver to ``key``; returns once the message is durable in ``new/``; OSError if not.

        The file work runs in one worker-thread job (file systems can be slow to create a
        file: that must not stall the event loop). Names and headers are made here, so the
        job holds the GIL, which this loop needs, as little as possible.
        """
        trace = f"Return-Path: <{envelope.sender}>\r\nDelivered-To: {key}\r\n".encode()
        size = len(trace) + len(message)
        name = maildir.unique_name(int(envelope.created), envelope.id, index, self.hostname, size)
        box = self._box(key)
        parts = (trace, message)
        self._in_flight += 1
        try:
            # Alone, the job fsyncs new/ itself (one hand-off); with others in flight, new/
            # is fsync'ed once for all of them that linked meanwhile.
            alone = self._in_flight == 1
            if await self.io.run(self._write, box, name, parts, check_duplicate, alone):
                await self._sync(box).sync()
        finally:
            self._in_flight -= 1

    def _sync(self, box: str) -> GroupSync:
        sync = self._syncs.get(box)
        if sync is None:
            sync = self._syncs[box] = GroupSync(Path(box, "new"), self.io)
        return sync

    def _write(
        self, box: str, name: str, parts: tuple[bytes, bytes], check_dup: bool, sync_new: bool
    ) -> bool:
        """The worker-thread job. True if the message was linked into ``new/`` and that
        directory still needs its (shared) fsync."""
        if box not in self._ensured:
            maildir.ensure(Path(box))
            self._ensured.add(box)
        try:
            return self._write_once(box, name, parts, check_dup, sync_new)
        except FileNotFoundError:  # the Maildir was removed since we last saw it
            maildir.ensure(Path(box))
            return self._write_once(box, name, parts, check_dup, sync_new)

    @staticmethod
    def _write_once(
        box: str, name: str, parts: tuple[bytes, bytes], check_dup: bool, sync_new: bool
    ) -> bool:
        if check_dup and maildir.already_delivered(Path(box), name):
            return False
        linked = maildir.deliver_tmpfile(box, name, parts, sync_new)
        if linked is None:  # no O_TMPFILE here: the classic way, which fsyncs new/ itself
            maildir.deliver(box, name, parts)
            return False
        return linked and not sync_new
