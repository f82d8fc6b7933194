"""framing.py: the only line splitter. Properties that must hold for any input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.wire import bulk
from postroom.wire.framing import (
    TOO_LONG,
    DotReader,
    LineEndCheck,
    LineReader,
    dot_stuff,
    to_crlf,
)


def read_all_data(stream: bytes, chunks: list[int] | None = None) -> tuple[bytes, bool, bytes]:
    """Feed ``stream`` to a DotReader (in the given chunk sizes); (data, bare, leftover)."""
    buf = bytearray()
    reader = DotReader()
    out: list[bytes] = []
    bare = False
    pos = 0
    sizes = chunks or [len(stream) or 1]
    i = 0
    while pos < len(stream) or buf:
        step = sizes[i % len(sizes)] or 1
        i += 1
        buf += stream[pos : pos + step]
        pos += step
        while not reader.done:
            chunk = reader.read(buf)
            if chunk is None:
                break
            out.append(chunk.data)
            bare = bare or chunk.bare
        if reader.done or pos >= len(stream):
            break
    return b"".join(out), bare, bytes(buf) + stream[pos:]


@given(st.binary(max_size=2000))
def test_stuff_then_unstuff_is_identity(data: bytes) -> None:
    expected = data if data == b"" or data.endswith(b"\r\n") else data + b"\r\n"
    got, _bare, rest = read_all_data(dot_stuff(data))
    assert got == expected
    assert rest == b""


@given(st.binary(max_size=600), st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_chunking_does_not_change_the_result(data: bytes, sizes: list[int]) -> None:
    stream = dot_stuff(data) + b"MAIL FROM:<x@y>\r\n"
    assert read_all_data(stream, sizes) == read_all_data(stream)


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from(
            [
                b"a",
                b".",
                b"\r",
                b"\n",
                b"\r\n",
                b"\r\n.\r\n",
                b"\n.\n",
                b"\r.\r",
                b"MAIL FROM:<a@b>",
            ]
        ),
        max_size=40,
    )
)
def test_one_data_section_never_yields_two_messages(parts: list[bytes]) -> None:
    stream = b"".join(parts)
    _data, _bare, _rest = read_all_data(stream)
    # The reader stops at the first CRLF.CRLF (or the message start ".\r\n") and never before.
    text = b"\r\n" + stream
    first = text.find(b"\r\n.\r\n")
    reader_done = first >= 0
    if reader_done:
        assert _rest == stream[first + 3 :]


def test_smuggling_variants_do_not_end_data() -> None:
    for sep in (b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\n.\r", b"\r.\r\n"):
        stream = b"Subject: x\r\n\r\nbody" + sep + b"MAIL FROM:<evil@x>\r\n"
        _data, bare, rest = read_all_data(stream)
        assert rest == b"" or not rest.startswith(b"MAIL"), sep
        assert bare, sep


def test_dot_unstuffing() -> None:
    data, bare, rest = read_all_data(b"..a\r\n...\r\nb.\r\n.\r\nNEXT")
    assert data == b".a\r\n..\r\nb.\r\n"
    assert not bare
    assert rest == b"NEXT"


def test_empty_message() -> None:
    assert read_all_data(b".\r\n") == (b"", False, b"")


def test_long_line_is_passed_through_in_pieces() -> None:
    line = b"x" * 200_000
    data, bare, rest = read_all_data(line + b"\r\n.\r\n", [70_000])
    assert data == line + b"\r\n"
    assert not bare and rest == b""


def test_line_reader_limits() -> None:
    r = LineReader(10)
    r.feed(b"short\r\n" + b"x" * 50 + b"\r\nnext\n")
    assert r.read_line() == b"short"
    assert r.read_line() is TOO_LONG
    assert r.read_line() == b"next"
    assert r.read_line() is None


def test_line_reader_discards_overlong_across_feeds() -> None:
    r = LineReader(10)
    r.feed(b"y" * 30)
    assert r.read_line() is None
    r.feed(b"y" * 30)
    assert r.read_line() is None
    r.feed(b"\r\nNOOP\r\n")
    assert r.read_line() is TOO_LONG
    assert r.read_line() == b"NOOP"


def test_to_crlf() -> None:
    assert to_crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"
    assert to_crlf(b"a\r\n") == b"a\r\n"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"."]), max_size=40).map(b"".join))
def test_to_crlf_ends_every_line_with_crlf_and_keeps_the_rest(data: bytes) -> None:
    out = to_crlf(data)
    saved, bulk.BULK = bulk.BULK, 0  # the array path gives the same
    try:
        assert to_crlf(data) == out
    finally:
        bulk.BULK = saved
    assert out.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    assert out.count(b"\n") == out.count(b"\r\n")


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_line_end_check_agrees_with_the_whole_message(data: bytes, cuts: list[int]) -> None:
    # However the BDAT chunks split it, the verdict is the one on the whole message.
    check = LineEndCheck()
    pos = 0
    for cut in sorted(cuts):
        check.feed(data[pos:cut])
        pos = max(pos, cut)
    check.feed(data[pos:])
    crlf = data.count(b"\r\n")
    assert check.finish() == (data.count(b"\n") != crlf or data.count(b"\r") != crlf)
