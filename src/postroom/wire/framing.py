"""The one place where SMTP and POP3 bytes are split into lines and message data.

Line endings are decided here and nowhere else (the SMTP smuggling class of bugs comes from
framing written twice). The rules:

* Command lines end at LF; a preceding CR is removed. A command line longer than the limit is
  discarded up to its LF and reported as :data:`TOO_LONG`, never truncated and executed.
* Message data (SMTP DATA) ends exactly at CRLF "." CRLF (RFC 5321 §4.1.1.4). Lines are split
  only at CRLF, so a bare LF or bare CR next to a dot can never end the message or start a
  second one (RFC 5321 §2.3.8; the 2023 "SMTP smuggling" attacks). Bare CR/LF in the data are
  reported (``DotChunk.bare``) so that the policy can reject the message, and so are NUL
  octets (``DotChunk.nul``): RFC 5322 §2.1 allows none, and a next hop that drops them would
  see ``CRLF NUL "." CRLF`` as the end of the message.
* Dot-stuffing (RFC 5321 §4.5.2): a leading "." of a data line is removed on input and added on
  output. BDAT chunks (RFC 3030) are counted, never stuffed, and checked for bare CR/LF and
  NUL like DATA (:class:`LineEndCheck`): what is stored may be relayed with DATA to a next hop.

The readers work on whole blocks of complete lines, never line by line: this is the hot path
of every message. The scans themselves (line ends, dots) are ``bulk.py``'s, at array speed
for large blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from postroom.wire import bulk


class _TooLong:
    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()
"""Returned by :meth:`LineReader.read_line` for a line over the limit (already discarded)."""

# A partial data line longer than this is passed on without waiting for its CRLF, so that a
# client cannot make us buffer without bound. The message is still parsed correctly.
_PARTIAL_FLUSH = 1 << 16


class LineReader:
    """Splits a byte stream into command lines; owns the connection's read buffer."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.buf = bytearray()
        self._discarding = False
        self.too_long_head = b""  # the first octets of the last line that was TOO_LONG

    def feed(self, data: bytes) -> None:
        self.buf += data

    def pending(self) -> int:
        """Octets received but not consumed yet."""
        return len(self.buf)

    def discard(self) -> int:
        """Drop everything buffered (plaintext pipelined after STARTTLS); returns the count."""
        n = len(self.buf)
        self.buf.clear()
        return n

    def read_line(self) -> bytes | _TooLong | None:
        """The next line without its line end, TOO_LONG, or None if no complete line yet."""
        buf = self.buf
        i = buf.find(b"\n", 0, self.max_line + 2)
        if i < 0:
            if len(buf) <= self.max_line + 1:
                return None
            # Over the limit: drop it up to its LF (which may not have come yet).
            if not self._discarding:
                self.too_long_head = bytes(buf[:HEAD])
            i = buf.find(b"\n")
            if i < 0:
                self._discarding = True
                buf.clear()
                return None
            del buf[: i + 1]
            self._discarding = False
            return TOO_LONG
        line = bytes(buf[:i])
        del buf[: i + 1]
        if self._discarding:
            self._discarding = False
            return TOO_LONG
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            self.too_long_head = line[:HEAD]
            return TOO_LONG
        return line


HEAD = 16  # octets of a too-long line kept: enough to tell its command


@dataclass(frozen=True, slots=True)
class DotChunk:
    """Unstuffed message data; ``bare`` is True if it held a CR or LF outside a CRLF pair,
    ``nul`` if it held a NUL octet."""

    data: bytes
    bare: bool
    nul: bool = False


class DotReader:
    """Reads SMTP DATA content up to CRLF.CRLF from a :class:`LineReader`'s buffer."""

    def __init__(self) -> None:
        self._at_line_start = True
        self.done = False

    def read(self, buf: bytearray) -> DotChunk | None:
        """Consume what can be consumed from ``buf``; None when more input is needed.

        After the chunk that ends the message, :attr:`done` is True and ``buf`` holds only
        what came after the terminator (pipelined commands).
        """
        end = buf.rfind(b"\r\n")
        if end < 0:
            if len(buf) <= _PARTIAL_FLUSH:
                return None
            # A very long line: pass on all but a trailing CR (which may start a CRLF).
            cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            block = bytes(buf[:cut])
            del buf[:cut]
            stuffed_start = self._at_line_start and block.startswith(b".")
            self._at_line_start = False
            data = block[1:] if stuffed_start else block
            return DotChunk(data, b"\r" in data or b"\n" in data, b"\0" in data)
        block_len = end + 2
        if self._at_line_start:
            text = b"\r\n" + buf[:block_len]  # bytes + bytearray: bytes, one copy fewer
            offset = 2
        else:
            text = bytes(buf[:block_len])
            offset = 0
        stop, data, bare, nul = bulk.dot_block(text, offset)
        if stop >= 0:  # the content ends before the "." CRLF line, which is consumed too
            del buf[: stop + 3 - offset]
            self.done = True
        else:
            del buf[:block_len]
        self._at_line_start = True
        return DotChunk(data, bare, nul)


class LineEndCheck:
    """Finds a CR or LF outside a CRLF pair in data that arrives in arbitrary pieces (the BDAT
    chunks of one message: a pair may be split between two)."""

    def __init__(self) -> None:
        self.bare = False
        self.nul = False  # RFC 5322 §2.1: no NUL anywhere in a message
        self._cr_pending = False  # the last piece ended with a CR: its LF may come next

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.nul = self.nul or b"\0" in data
        if self._cr_pending:
            if data.startswith(b"\n"):
                data = data[1:]
            else:
                self.bare = True
        self._cr_pending = data.endswith(b"\r")
        if self._cr_pending:
            data = data[:-1]
        self.bare = self.bare or bulk.has_bare(data)

    def finish(self) -> bool:
        """True if the whole message had a bare CR or LF (a CR at its very end too)."""
        return self.bare or self._cr_pending


class CountedReader:
    """Reads exactly ``size`` octets (one BDAT chunk, RFC 3030 §2)."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def read(self, buf: bytearray) -> bytes | None:
        if self.remaining == 0 or not buf:
            return None
        n = min(self.remaining, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        self.remaining -= n
        return data


def dot_stuff(data: bytes) -> bytes:
    """Stuff message data for DATA/RETR and append the end-of-data line (RFC 5321 §4.5.2,
    RFC 1939 §3: a line that starts with a dot gets one more).

    A final line without CRLF gets one. Lines are those ending in CRLF, the same rule the
    readers use, so ``DotReader`` gives back ``data`` (plus a CRLF if it lacked one).
    """
    body, end = dot_stuff_parts(data)
    return body + end


def dot_stuff_parts(data: bytes) -> tuple[bytes, bytes]:
    """:func:`dot_stuff` as (stuffed data, what ends it), so that a writer can send both
    without joining them (no copy of a large message)."""
    if data.startswith(b"."):
        data = b"." + data  # the first line's; bulk.stuff finds the others after their CRLF
    data = bulk.stuff(data)
    # The common case: nothing to stuff, no copies.
    return data, b".\r\n" if not data or data.endswith(b"\r\n") else b"\r\n.\r\n"


def to_crlf(data: bytes) -> bytes:
    """Turn bare LF line ends (as Maildir files have them) into CRLF; CRLF stays CRLF. An LF
    file is one ``replace`` of a one-octet needle (memchr speed); data that is CRLF already (a
    relayed message meets this more than once) is recognised by counting, or in a large one by
    ``bulk.has_bare``."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    if len(data) >= bulk.BULK:
        if not bulk.has_bare(data):
            return data
    elif data.count(b"\n") == data.count(b"\r\n"):
        return data
    # Two C-speed passes instead of a look-behind regex: CRLF -> LF, then every LF -> CRLF.
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class CrlfConverter:
    """Turns bare LF into CRLF in a stream of pieces; joined output == ``to_crlf(whole)``.

    The only state carried between pieces is a CR that ended one piece: it may pair with an
    LF at the start of the next.
    """

    def __init__(self) -> None:
        self._cr = b""

    def feed(self, data: bytes) -> bytes:
        data = self._cr + data
        self._cr = b"\r" if data.endswith(b"\r") else b""
        return to_crlf(data[: len(data) - len(self._cr)])

    def finish(self) -> bytes:
        out, self._cr = self._cr, b""
        return out


class Stuffer:
    """Dot-stuffs a message that arrives in pieces (POP3 RETR of a large file).

    Joining the outputs of :meth:`feed` and :meth:`finish` equals :func:`dot_stuff` of the
    whole message: the only state carried between pieces is "the last piece ended a line".
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._last_cr = False
        self._empty = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        # Re-attach what ended the previous piece, so that a line start is seen across pieces.
        prefix = b"\r\n" if self._at_line_start else (b"\r" if self._last_cr else b"")
        text = prefix + data
        self._empty = False
        self._at_line_start = text.endswith(b"\r\n")
        self._last_cr = data.endswith(b"\r")
        return bulk.stuff(text)[len(prefix) :]

    def finish(self) -> bytes:
        if self._empty or self._at_line_start:
            return b".\r\n"
        return b"\r\n.\r\n"
