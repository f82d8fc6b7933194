"""A POP3 session's bookkeeping over a maildrop snapshot (RFC 1939 semantics), and TOP.

Pure: the messages are known by number, size and UIDL (what
:meth:`postroom.storage.interfaces.Maildrop.open` returned); this module keeps the deletion
marks (DELE, RSET), which messages were retrieved, and renders STAT, LIST and UIDL. Nothing is
applied until QUIT hands :meth:`Snapshot.deleted` and :meth:`Snapshot.seen` to the maildrop
(RFC 1939 §6). :class:`TopFilter` cuts a CRLF message after the header and N body lines
(RFC 1939 §7), whatever pieces it comes in.
"""

from __future__ import annotations

from collections.abc import Sequence

from postroom.storage.interfaces import MessageInfo


class Snapshot:
    """The messages of one session, with their deletion marks."""

    def __init__(self, messages: Sequence[MessageInfo]) -> None:
        self.messages = messages
        self._deleted: set[int] = set()
        self._retrieved: set[int] = set()

    def get(self, number: int) -> MessageInfo | None:
        """The live (not deleted) message with this 1-based number."""
        if 1 <= number <= len(self.messages) and number not in self._deleted:
            return self.messages[number - 1]
        return None

    def delete(self, number: int) -> None:
        self._deleted.add(number)

    def retrieved(self, number: int) -> None:
        self._retrieved.add(number)

    def reset(self) -> None:
        self._deleted.clear()

    def stat(self) -> tuple[int, int]:
        """(messages, octets) of the live messages (RFC 1939 §5)."""
        if not self._deleted:
            return len(self.messages), sum(m.size for m in self.messages)
        live = [m for i, m in enumerate(self.messages, 1) if i not in self._deleted]
        return len(live), sum(m.size for m in live)

    def listing(self, uids: bool) -> bytes:
        """The body of LIST or UIDL without an argument, ending with ``.\\r\\n``."""
        gone = self._deleted
        if uids:
            lines = [f"{i} {m.uid}\r\n" for i, m in enumerate(self.messages, 1) if i not in gone]
        else:
            lines = [f"{i} {m.size}\r\n" for i, m in enumerate(self.messages, 1) if i not in gone]
        lines.append(".\r\n")
        return "".join(lines).encode()

    def deleted(self) -> list[int]:
        return sorted(self._deleted)

    def seen(self) -> list[int]:
        """Retrieved and not deleted: to be marked as read."""
        return sorted(self._retrieved - self._deleted)


class TopFilter:
    """Passes the header section, the blank line and ``lines`` body lines (RFC 1939 §7 TOP).

    Fed CRLF text in pieces; the joined output does not depend on how it was cut, and
    :attr:`done` turns True once nothing more is needed. A message without a blank line is all
    header and is passed whole.
    """

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.done = False
        self._in_body = False
        # The last octets of the header section seen so far, to find CRLF CRLF across pieces;
        # it starts as a line end so that a message opening with an empty line has no header.
        self._tail = b"\r\n"
        self._cr = False  # the body so far ends with CR (its LF may come next)

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        out = b""
        if not self._in_body:
            text = self._tail + data
            end = text.find(b"\r\n\r\n")
            if end < 0:
                self._tail = text[-3:]
                return data
            cut = end + 4 - len(self._tail)  # where the body starts in ``data``
            out, data = data[:cut], data[cut:]
            self._in_body = True
        if self.lines == 0:
            self.done = True
            return out
        prefix = b"\r" if self._cr else b""
        text = prefix + data
        pos = 0
        while self.lines > 0:
            i = text.find(b"\r\n", pos)
            if i < 0:
                break
            pos = i + 2
            self.lines -= 1
        if self.lines == 0:
            self.done = True
            return out + text[len(prefix) : pos]
        self._cr = text.endswith(b"\r")
        return out + data
