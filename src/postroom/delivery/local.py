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


class LocalDelivery:
    """Writes into Maildirs under ``data_dir``; blocking work runs on ``executor``."""

    def __init__(self, data_dir: Path, hostname: str, executor: ThreadPoolExecutor) -> None:
        self.data_dir = data_dir
        self.hostname = hostname
        self.executor = executor
        self._ensured: set[Path] = set()  # Maildirs known to exist: no stat per delivery

    def _write(
        self, envelope: Envelope, index: int, key: str, message: bytes, check_duplicate: bool
    ) -> Path | None:
        path = maildir.mailbox_path(self.data_dir, key)
        if path not in self._ensured:
            maildir.ensure(path)
            self._ensured.add(path)
        trace = f"Return-Path: <{envelope.sender}>\r\nDelivered-To: {key}\r\n".encode()
        size = len(trace) + len(message)
        name = maildir.unique_name(int(envelope.created), envelope.id, index, self.hostname, size)
        if check_duplicate and maildir.already_delivered(path, name):
            return None
        # One worker-thread job: file, link and the fsync of new/ (concurrent fsyncs of new/
        # are merged by the file system's journal commit, cheaper than a second hand-off).
        try:
            maildir.deliver(path, name, (trace, message))
        except FileNotFoundError:
            # The Maildir was removed since we last saw it (an admin deleting a mailbox).
            self._ensured.discard(path)
            maildir.ensure(path)
            maildir.deliver(path, name, (trace, message))
        return path

    async def deliver(
        self,
        envelope: Envelope,
        index: int,
        key: str,
        message: bytes,
        check_duplicate: bool = False,
    ) -> None:
        """Deliver to ``key``; returns once the message is durable in ``new/``; OSError if not."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self.executor, self._write, envelope, index, key, message, check_duplicate
        )
