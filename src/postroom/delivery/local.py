"""Local delivery: a queued message into each local recipient's Maildir.

Prepends ``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To``, and changes nothing else. The
Maildir file name is derived from the queue id and recipient index, so a delivery repeated after
a crash finds the earlier copy and does not deliver it twice. The file write, its fsync, the link
into ``new/`` and the fsync of ``new/`` happen in one worker-thread job: one hand-off per delivery.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from postroom.queue.store import Envelope
from postroom.storage import maildir

BOX_CACHE = 10_000


class LocalDelivery:
    """Writes into Maildirs under ``data_dir``; blocking work runs on ``executor``."""

    def __init__(self, data_dir: Path, hostname: str, executor: ThreadPoolExecutor) -> None:
        self.data_dir = data_dir
        self.hostname = hostname
        self.executor = executor
        self._ensured: set[str] = set()  # Maildirs known to exist: no stat per delivery
        self._boxes: dict[str, str] = {}  # recipient key -> its Maildir, as a string

    def _box(self, key: str) -> str:
        box = self._boxes.get(key)
        if box is None:
            if len(self._boxes) >= BOX_CACHE:
                self._boxes.clear()
            box = self._boxes[key] = str(maildir.mailbox_path(self.data_dir, key))
        return box

    def _write(self, box: str, name: str, parts: tuple[bytes, bytes], check_dup: bool) -> None:
        """The worker-thread job: only file-system calls, so that it holds the GIL briefly."""
        if box not in self._ensured:
            maildir.ensure(Path(box))
            self._ensured.add(box)
        if check_dup and maildir.already_delivered(Path(box), name):
            return
        try:
            maildir.deliver(box, name, parts)
        except FileNotFoundError:
            # The Maildir was removed since we last saw it (an admin deleting a mailbox).
            self._ensured.discard(box)
            maildir.ensure(Path(box))
            maildir.deliver(box, name, parts)

    async def deliver(
        self,
        envelope: Envelope,
        index: int,
        key: str,
        message: bytes,
        check_duplicate: bool = False,
    ) -> None:
        """Deliver to ``key``; returns once the message is durable in ``new/``; OSError if not."""
        trace = f"Return-Path: <{envelope.sender}>\r\nDelivered-To: {key}\r\n".encode()
        size = len(trace) + len(message)
        name = maildir.unique_name(int(envelope.created), envelope.id, index, self.hostname, size)
        # One worker-thread job: file, link and the (shared) fsync of new/.
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self._write, self._box(key), name, (trace, message), check_duplicate
        )
