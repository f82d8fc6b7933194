"""Line-end and dot scans of large message data at array speed, for the rules of ``framing.py``.

Python's bytes methods pay for every match of a needle longer than one octet, and count even
one-octet needles an octet at a time: on 100 KiB of mail (short lines, some 1,300 of them)
``replace(b"\\r\\n", b"\\n")`` or ``count(b"\\n")`` cost 60 to 260 µs on a 2 GHz core, and a
message needs several such passes (bare CR/LF, the end of data, dots, CRLF to LF). numpy
compares all the octets at once instead: the masks of CR and LF, and of the "." that starts a
line, are a few microseconds each per 100 KiB, and the answers come from comparing the masks
(every CR is followed by an LF exactly when the CR mask, shifted by one, is the LF mask).
Listing positions costs more than masks, so only the few line-start dots are listed. Data
without a bare CR turns to LF line ends by deleting every CR, a one-octet needle that
``replace`` removes at memchr speed. Reading one 100 KiB DATA block and its CRLF-to-LF copy
together went from about 500 µs (positions of every line end) to 250 µs (measured on a
100 KiB message read in 64 KiB pieces). Below :data:`BULK` octets the bytes methods win
(numpy's cost per call), and LF to CRLF (``framing.to_crlf``) stays a bytes method.
Both paths give the same answer for every input (tests/unit/test_bulk.py checks it with
hypothesis); the rules themselves are documented in ``framing.py``.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Any

BULK = 16384  # octets: from here on the array path is the faster one (measured, 2 GHz Xeon)

CR, LF, DOT = 13, 10, 46
_FEW = 200  # dotted lines up to which slices joined beat an array copy

Positions = Any  # a numpy array of indices (numpy's own types add nothing for mypy here)


_numpy: Any = None


def np() -> Any:
    """numpy, imported on first use (a large message): importing it costs a quarter of a
    second, which the admin commands and a server that sees only small mail never pay."""
    global _numpy
    if _numpy is None:
        _numpy = importlib.import_module("numpy")
    return _numpy


def _array(data: bytes | bytearray | memoryview) -> Any:
    np_ = np()
    return np_.frombuffer(data, np_.uint8)


def _bare_in(is_cr: Any, is_lf: Any) -> bool:
    """A CR or LF outside a CRLF pair, from the masks of every CR and every LF of the data:
    none exactly when each CR is followed by an LF and each LF follows a CR, that is when
    the CR mask shifted by one is the LF mask."""
    if not is_cr.size:
        return False
    return bool(is_lf[0] or is_cr[-1] or not np().array_equal(is_cr[:-1], is_lf[1:]))


def _bare_cr_in(a: Any, is_cr: Any) -> bool:
    """A CR not followed by an LF."""
    return bool(is_cr[-1] or (is_cr[:-1] & (a[1:] != LF)).any())


def has_bare(data: bytes) -> bool:
    """A CR or LF outside a CRLF pair."""
    if len(data) < BULK:
        crlf = data.count(b"\r\n")
        return data.count(b"\n") != crlf or data.count(b"\r") != crlf
    a = _array(data)
    return _bare_in(a == CR, a == LF)


def crlf_to_lf(data: bytes) -> bytes:
    """Every CRLF pair as a bare LF; a CR or LF on its own stays as it is."""
    if len(data) < BULK or not data:
        return data.replace(b"\r\n", b"\n")
    a = _array(data)
    is_cr = a == CR
    if not _bare_cr_in(a, is_cr):  # the common case: every CR ends a line
        return data.replace(b"\r", b"")  # a one-octet needle: memchr speed
    pairs = np().flatnonzero(is_cr[:-1] & (a[1:] == LF))
    return bytes(np().delete(a, pairs).tobytes()) if pairs.size else data


def stuff(text: bytes) -> bytes:
    """Another "." after every CRLF that a "." follows (RFC 5321 §4.5.2, RFC 1939 §3)."""
    if len(text) < BULK:
        return text.replace(b"\r\n.", b"\r\n..")
    a = _array(text)
    dots = _line_dots(a, a == CR, a == LF)
    if dots.size > _FEW:
        return bytes(np().insert(a, dots, DOT).tobytes())
    cuts = [0, *dots.tolist(), len(text)]
    return b".".join([text[i:j] for i, j in itertools.pairwise(cuts)])


def _line_dots(a: Any, is_cr: Any, is_lf: Any) -> Positions:
    """Positions of the "." that starts a line: right after a CRLF. Compared as whole masks
    (a few microseconds per 100 KiB each): listing every line end first costs more."""
    if len(a) < 3:
        return np().zeros(0, np().intp)
    return np().flatnonzero(is_cr[:-2] & is_lf[1:-1] & (a[2:] == DOT)) + 2


def dot_block(text: bytes, offset: int) -> tuple[int, bytes, bool, bool]:
    """One block of DATA lines (``text``, whose first ``offset`` octets are a CRLF put
    before it so that its first line is seen as one): ``(end, data, bare, nul)``.

    ``end`` is where the end-of-data line "." CRLF starts (-1 if the block holds none: all of
    it is content); ``data`` the content before it, dot-unstuffed, without the ``offset``
    octets; ``bare`` and ``nul`` whether that content holds a CR or LF outside a CRLF pair, or
    a NUL. The end of data is the first CRLF "." CRLF (RFC 5321 §4.1.1.4), its CRLF being the
    content's last line end.
    """
    if len(text) < BULK:
        term = text.find(b"\r\n.\r\n")
        content = text[: term + 2] if term >= 0 else text
        crlf = content.count(b"\r\n")
        bare = content.count(b"\n") != crlf or content.count(b"\r") != crlf
        data = content.replace(b"\r\n.", b"\r\n")[offset:]
        return (term + 2 if term >= 0 else -1), data, bare, b"\0" in content
    a = _array(text)
    is_cr, is_lf = a == CR, a == LF
    dots = _line_dots(a, is_cr, is_lf)  # few: the end of data is one of them
    last = dots[dots + 2 < len(a)]
    ends = last[(a[last + 1] == CR) & (a[last + 2] == LF)]
    end = int(ends[0]) if ends.size else len(a)
    bare = _bare_in(is_cr[:end], is_lf[:end])
    nul = text.find(b"\0", 0, end) >= 0
    dots = dots[dots < end]
    if dots.size > _FEW:
        data = bytes(np().delete(a[:end], dots)[offset:].tobytes())
    else:  # the common case: a few dots, each the start of a slice
        cuts = [offset - 1, *dots.tolist(), end]
        data = b"".join([text[i + 1 : j] for i, j in itertools.pairwise(cuts)])
    return (end if ends.size else -1), data, bare, nul
