"""Local delivery: a queued message into each local recipient's Maildir.

Prepends ``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To``, and changes nothing else. The
Maildir file name is derived from the queue id and recipient index, so a delivery repeated after
a crash finds the earlier copy and does not deliver it twice. The file work is done by the
Maildir writer process (:mod:`postroom.storage.local.maildir_writer`); names and headers are
made here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from postroom.queue.store import Envelope
from postroom.storage.local import maildir
from postroom.storage.local.journal import Target
from postroom.storage.local.maildir_writer import MaildirWriter

BOX_CACHE = 10_000


class LocalDelivery:
    """Writes into Maildirs under ``data_dir`` through a :class:`MaildirWriter`."""

    def __init__(
        self,
        data_dir: Path,
        hostname: str,
        run_as: tuple[int, int] | None = None,
        cpu: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.hostname = hostname
        self.writer = MaildirWriter(data_dir / "journal", run_as, cpu)
        self._boxes: dict[str, str] = {}  # recipient key -> its Maildir, as a string

    def _box(self, key: str) -> str:
        box = self._boxes.get(key)
        if box is None:
            if len(self._boxes) >= BOX_CACHE:
                self._boxes.clear()
            box = self._boxes[key] = str(maildir.mailbox_path(self.data_dir, key))
        return box

    def mailbox(self, key: str) -> str:
        """The Maildir of a recipient (for the logs)."""
        return self._box(key)

    def _name(self, envelope: Envelope, index: int, key: str, message: bytes) -> tuple[str, bytes]:
        head = f"Return-Path: <{envelope.sender}>\r\nDelivered-To: {key}\r\n".encode()
        size = len(head) + len(message)
        name = maildir.unique_name(int(envelope.created), envelope.id, index, self.hostname, size)
        return name, head

    async def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[tuple[int, str]],
        message: bytes,
        check_duplicate: bool = False,
    ) -> list[OSError | None]:
        """Deliver to each (recipient index, address key); for each, once the message is
        durable (in the writer's journal) and in ``new/``: None, or the OSError that kept it
        out."""
        targets = []
        for index, key in recipients:
            name, head = self._name(envelope, index, key, message)
            targets.append(Target(self._box(key), name, head))
        results = await self.writer.write(targets, message, check_duplicate)
        return [r if isinstance(r, OSError) else None for r in results]

    def withdraw(
        self, envelope: Envelope, recipients: Sequence[tuple[int, str]], message: bytes
    ) -> None:
        """Take back copies :meth:`deliver` wrote, still unread in ``new/`` (blocking): for a
        message refused after all, whose client will send it again."""
        for index, key in recipients:
            name, _head = self._name(envelope, index, key, message)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._box(key), "new", name))

    async def close(self) -> None:
        await self.writer.close()
