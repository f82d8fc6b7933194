"""wire/bulk.py: the array path gives what the bytes path gives, for any data.

The functions take the bytes path below ``BULK`` octets; these tests run every input through
both (``BULK`` lowered to 0 for the array path, once with the dotted lines cut out as slices
and once as an array copy) and compare, with inputs made of the octets
that matter (CR, LF, ".", NUL) among others, so that pairs, lone ends and dots at block edges
all occur.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.wire import bulk

MAIL_BYTES = st.binary(max_size=0) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\0", b"a", b"bc", b"\r\n.", b"\r\n.\r\n"]),
    max_size=60,
).map(b"".join)


@contextmanager
def array_path(few: int) -> Iterator[None]:
    saved = bulk.BULK, bulk._FEW
    bulk.BULK, bulk._FEW = 0, few
    try:
        yield
    finally:
        bulk.BULK, bulk._FEW = saved


def both(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    small = fn(*args)
    with array_path(bulk._FEW):
        large = fn(*args)
    with array_path(0):
        assert fn(*args) == large
    return small, large


@settings(max_examples=400)
@given(MAIL_BYTES)
def test_has_bare(data: bytes) -> None:
    small, large = both(bulk.has_bare, data)
    assert small == large
    assert small == (data.replace(b"\r\n", b"").translate(None, b"ab.\0c") != b"")


@pytest.mark.parametrize(
    ("fn", "reference"),
    [
        (bulk.crlf_to_lf, lambda d: d.replace(b"\r\n", b"\n")),
        (bulk.stuff, lambda d: d.replace(b"\r\n.", b"\r\n..")),
    ],
    ids=["crlf_to_lf", "stuff"],
)
@settings(max_examples=400)
@given(data=MAIL_BYTES)
def test_a_copy_agrees_with_its_bytes_method(
    fn: Callable[[bytes], bytes], reference: Callable[[bytes], bytes], data: bytes
) -> None:
    small, large = both(fn, data)
    assert small == large == reference(data)


@settings(max_examples=600)
@given(MAIL_BYTES, st.booleans())
def test_dot_block(data: bytes, line_start: bool) -> None:
    text = (b"\r\n" if line_start else b"") + data
    offset = 2 if line_start else 0
    small, large = both(bulk.dot_block, text, offset)
    assert small == large
    end, out, bare, nul = large
    term = text.find(b"\r\n.\r\n")
    assert end == (term + 2 if term >= 0 else -1)
    content = text[:end] if end >= 0 else text
    assert out == content.replace(b"\r\n.", b"\r\n")[offset:]
    assert nul == (b"\0" in content)
    assert bare == (content.replace(b"\r\n", b"").translate(None, b"ab.\0c") != b"")


@pytest.mark.parametrize("size", [bulk.BULK - 1, bulk.BULK, 5 * bulk.BULK])
def test_a_message_either_side_of_the_threshold(size: int) -> None:
    line = b"..a line of mail that starts with a dot\r\n"
    text = b"\r\n" + line * (size // len(line) + 1) + b".\r\nQUIT\r\n"
    assert len(text) > size
    end, out, bare, nul = bulk.dot_block(text, 2)
    assert text[end:] == b".\r\nQUIT\r\n"
    assert out == text[:end].replace(b"\r\n.", b"\r\n")[2:]
    assert (bare, nul) == (False, False)
