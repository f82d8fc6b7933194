"""What the servers ask of storage, as typing.Protocol classes: one backend module per interface.

The POP3 side: a :class:`Maildrops` opens a user's :class:`Maildrop`, a locked snapshot of a
mailbox for one session (RFC 1939 §8: one session per maildrop; RFC 2449 §8.1.1 ``[IN-USE]``
when another holds it). Message numbers are positions in the snapshot, 1-based. Text comes out
with CRLF line ends whatever the backend stores (RFC 1939 §3), and the sizes in the snapshot are
exactly the octets RETR sends before dot-stuffing (RFC 1939 §5, §11). Deletions are applied only
by :meth:`Maildrop.update` (the UPDATE state, RFC 1939 §6); a session that ends otherwise changes
nothing. Today's backend is the Maildir one in ``storage/local/maildrop.py``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a snapshot: the octets RETR sends (CRLF, unstuffed) and its UIDL
    (RFC 1939 §7: 1 to 70 characters 0x21-0x7E, never reused for another message)."""

    size: int
    uid: str


class Maildrop(Protocol):
    """One session's view of one mailbox; made by :meth:`Maildrops.maildrop`."""

    async def open(self) -> Sequence[MessageInfo]:
        """Lock the mailbox and take the snapshot, oldest message first.

        Raises :class:`postroom.errors.MailboxInUse` if another session holds the lock, and
        OSError (or the backend's error) if the mailbox cannot be read now."""
        ...

    def read_now(self, number: int) -> bytes | None:
        """The whole message if the backend has it at hand without waiting long (a small local
        file), else None: then :meth:`chunks` it. FileNotFoundError if it is gone."""
        ...

    def chunks(self, number: int) -> AsyncGenerator[bytes, None]:
        """The message in pieces of bounded size, with CRLF line ends (a last line without one
        is ended by the dot-stuffing). FileNotFoundError if it is gone; closing the iterator
        early stops the reading (TOP)."""
        ...

    async def update(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        """Apply the UPDATE state: remove ``deleted``, mark ``seen`` (retrieved and kept) as
        read. Returns how many removals failed; a message already gone counts as removed."""
        ...

    async def close(self) -> None:
        """Release the lock (and whatever the session held). Safe to call more than once."""
        ...


class Maildrops(Protocol):
    """Opens maildrops: what the POP3 server gets from :class:`postroom.services.Services`."""

    def maildrop(self, key: str) -> Maildrop:
        """The maildrop of account ``key`` (``local@domain``, vetted by ``address.py``)."""
        ...
