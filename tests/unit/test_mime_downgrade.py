"""mime_downgrade: only what needs it changes, and a reader decodes the very same content."""

from __future__ import annotations

import base64
import email
import email.policy
import time
from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.delivery import mime_downgrade
from postroom.delivery.mime_downgrade import (
    MAX_LINE,
    MAX_NESTING,
    downgrade,
    fold_header,
    has_long_line,
)

LONG = b"x" * 5000
IMAGE = base64.encodebytes(bytes(range(256)) * 4).replace(b"\n", b"\r\n")


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def longest(data: bytes) -> int:
    return max(map(len, lines(data)))


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded payload) of every leaf, as a reader sees them."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def test_short_7bit_mail_is_returned_unchanged() -> None:
    raw = b"Subject: hi\r\n\r\nhello\r\n"
    assert downgrade(raw, eight_bit=False) is raw


def test_8bit_is_kept_for_a_peer_with_8bitmime() -> None:
    raw = b"Subject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n"
    assert downgrade(raw, eight_bit=True) == raw


def test_long_line_without_mime_becomes_quoted_printable() -> None:
    raw = b"From: a@a.test\r\nSubject: long\r\n\r\nstart " + LONG + b" end\r\nbye\r\n"
    out = downgrade(raw, eight_bit=True)
    assert longest(out) <= MAX_LINE
    assert b"MIME-Version: 1.0\r\n" in out
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert out.startswith(b"From: a@a.test\r\nSubject: long\r\n")
    assert leaves(out) == [("text/plain", b"start " + LONG + b" end\r\nbye\r\n")]


def test_8bit_without_mime_gets_a_charset() -> None:
    out = downgrade(b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n", eight_bit=False)
    assert out.isascii()
    assert b"charset=utf-8" in out
    out = downgrade(b"Subject: x\r\n\r\ncaf\xe9\r\n", eight_bit=False)
    assert out.isascii()
    assert b"charset=unknown-8bit" in out
    assert leaves(out) == [("text/plain", b"caf\xe9\r\n")]


def multipart(text_part: bytes, cte: bytes = b"") -> bytes:
    return (
        b"From: a@a.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUND"\r\n' + cte + b"\r\n"
        b"preamble\r\n"
        b"--BOUND\r\n" + text_part + b"\r\n"
        b"--BOUND\r\n"
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + IMAGE + b"\r\n"
        b"--BOUND--\r\n"
        b"epilogue\r\n"
    )


def test_only_the_affected_leaf_is_reencoded() -> None:
    text = b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + LONG + b"\r\n"
    raw = multipart(text)
    out = downgrade(raw, eight_bit=True)
    assert longest(out) <= MAX_LINE
    # The image part, the delimiters, preamble and epilogue are byte for byte the same.
    image_part = raw[raw.index(b"--BOUND\r\nContent-Type: image/png") :]
    assert out.endswith(image_part)
    assert out.startswith(raw[: raw.index(b"--BOUND\r\n") + 9])
    assert leaves(out) == leaves(raw)


def test_8bit_part_to_a_7bit_peer() -> None:
    text = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"gr\xc3\xbc\xc3\x9fe  \r\n.\r\n"
    )
    raw = multipart(text, b"Content-Transfer-Encoding: 8bit\r\n")
    out = downgrade(raw, eight_bit=False)
    assert out.isascii()
    assert out.count(b"Content-Transfer-Encoding: 8bit") == 0
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\ngr=C3=BC=C3=9Fe =20\r\n" in out
    # The multipart's own label follows what it now holds (RFC 2045 §6.4).
    assert out.split(b"\r\n\r\n", 1)[0].endswith(b"Content-Transfer-Encoding: 7bit")
    assert leaves(out) == leaves(raw)


def test_8bit_text_labelled_base64_is_kept_as_the_text_it_is() -> None:
    """8-bit octets are no base64: such a label is wrong (a client that sent its text as it
    is). Decoded as base64 the text became noise, in the relayed copy and in the local copies
    of a submission that also leaves (content probe); the octets are the content."""
    text = "Grüße aus Köln, das ist wichtig\r\n".encode()
    part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    out = downgrade(multipart(part + text, b""), eight_bit=False)
    assert out.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in out
    assert ("text/plain", text) in leaves(out)
    # Real base64 with a stray 8-bit octet is base64 still: the octet is skipped, as readers
    # skip it (it was taken for text, and the attachment re-encoded as its own base64).
    attachment = bytes(range(256)) * 4
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    stray = encoded[:100] + b"\xa0" + encoded[100:]
    part = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    out = downgrade(multipart(part + stray, b""), eight_bit=False)
    assert out.isascii() and ("application/octet-stream", attachment) in leaves(out)
    # Short ones too (a share of stray octets was taken for text: recheck3 probe).
    for raw in (b"Hallo Welt", b"0123456789", bytes(range(6))):
        for junk in (b"\xa0", b"\xe9", "\u00a0".encode(), b" \xe9", b"\xe9 \t"):
            short = base64.b64encode(raw) + junk + b"\r\n"
            out = downgrade(multipart(part + short, b""), eight_bit=False)
            assert ("application/octet-stream", raw) in leaves(out), (raw, junk)
    # And text, short or without spaces: "Grüße" alone is no base64.
    for text in ("Grüße\r\n", "Grüße aus Köln\r\n", "é\r\n", "Привет\r\n", "日本語\r\n"):
        plain = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
        out = downgrade(multipart(plain + b"\r\n" + text.encode(), b""), eight_bit=False)
        assert ("text/plain", text.encode()) in leaves(out)


def test_binary_leaf_is_base64() -> None:
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\x80abc\r\n" + LONG
    )
    out = downgrade(raw, eight_bit=False)
    assert out.isascii()
    assert b"Content-Transfer-Encoding: base64" in out
    assert b"binary" not in out
    assert leaves(out) == leaves(raw)


def test_text_with_bare_line_breaks_after_decoding_is_base64() -> None:
    # Quoted-printable cannot carry a bare CR; base64 can.
    encoded = base64.b64encode(b"a\rb" + b"y" * 2000)
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"\r\n"
    )
    out = downgrade(raw, eight_bit=False)
    assert longest(out) <= 76
    assert leaves(out) == leaves(raw)


def test_message_rfc822_is_walked_into() -> None:
    inner = b"Subject: inner\r\n\r\ncaf\xc3\xa9 " + LONG + b"\r\n"
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + inner
    )
    out = downgrade(raw, eight_bit=False)
    assert out.isascii()
    assert longest(out) <= MAX_LINE
    assert b"Content-Transfer-Encoding: 7bit\r\n" in out
    inner_out = body_of(out)
    assert inner_out.startswith(b"Subject: inner\r\n")
    assert leaves(inner_out) == [("text/plain", b"caf\xc3\xa9 " + LONG + b"\r\n")]


def test_long_header_is_folded_at_white_space() -> None:
    words = b" ".join([b"word"] * 400)
    raw = b"Subject: " + words + b"\r\nX-Token: " + LONG + b"\r\n\r\nbody\r\n"
    out = downgrade(raw, eight_bit=True)
    assert longest(out) <= MAX_LINE
    msg = email.message_from_bytes(out, policy=email.policy.compat32)
    subject = str(msg["Subject"])
    # Unfolding (RFC 5322 §2.2.3) gives the words back; folding moved no word.
    assert " ".join(subject.split()) == words.decode()
    assert body_of(out) == b"body\r\n"
    # No white space to fold at: broken like Postfix (CRLF SP), nothing lost.
    assert "".join(str(msg["X-Token"]).split()) == LONG.decode()


def test_fold_header_leaves_short_headers_alone() -> None:
    head = b"Subject: hi\r\nTo: b@b.test\r\n"
    assert fold_header(head) is head


def _check(raw: bytes, eight_bit: bool) -> None:
    out = downgrade(raw, eight_bit=eight_bit)
    assert longest(out) <= MAX_LINE
    if not eight_bit:
        head = out.split(b"\r\n\r\n", 1)[0]
        assert head.isascii() or not out.isascii()
        assert body_of(out + b"\r\n\r\n").isascii()
    assert leaves(out) == leaves(raw)


@settings(max_examples=150, deadline=None)
@given(
    body=st.lists(
        st.one_of(
            st.binary(min_size=0, max_size=40),
            st.builds(lambda n, c: c * n, st.integers(990, 1300), st.sampled_from([b"a", b"\xe9"])),
        ),
        max_size=8,
    ),
    eight_bit=st.booleans(),
    cte=st.sampled_from([b"", b"8bit", b"7bit", b"binary"]),
    ctype=st.sampled_from([b"text/plain; charset=utf-8", b"application/octet-stream", b""]),
)
def test_any_leaf_fits_and_decodes_the_same(
    body: list[bytes], eight_bit: bool, cte: bytes, ctype: bytes
) -> None:
    content = b"\r\n".join(b.replace(b"\r", b"").replace(b"\n", b"") for b in body)
    head = b"Subject: t\r\nMIME-Version: 1.0\r\n"
    if ctype:
        head += b"Content-Type: " + ctype + b"\r\n"
    if cte:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    raw = head + b"\r\n" + content
    _check(raw, eight_bit)
    _check(multipart(head.split(b"\r\n", 2)[2] + b"\r\n" + content), eight_bit)


def test_leaves_helper_reads_parts() -> None:
    msg: Message = email.message_from_bytes(multipart(b"\r\nhi"))
    assert msg.is_multipart()


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from(
                [
                    b"\r\n",
                    b"\r\n\r\n",
                    b"--B\r\n",
                    b"--B--\r\n",
                    b"Content-Type: multipart/mixed; boundary=B\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Transfer-Encoding: base64\r\n",
                    b"Content-Transfer-Encoding: quoted-printable\r\n",
                    b"x" * 1200,
                    b"\xff" * 1100,
                    b" " * 3,
                ]
            ),
        ),
        max_size=30,
    ),
    eight_bit=st.booleans(),
)
def test_garbage_never_leaves_a_long_line(pieces: list[bytes], eight_bit: bool) -> None:
    raw = b"".join(pieces).replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")
    out = downgrade(raw, eight_bit=eight_bit)
    assert longest(out) <= MAX_LINE


def test_message_without_header_section_is_all_body() -> None:
    raw = b"Hello Bob, " + LONG + b"\r\nbye\r\n"
    out = downgrade(raw, eight_bit=True)
    head = out.split(b"\r\n\r\n", 1)[0]
    assert head == b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0"
    assert leaves(out) == [("text/plain", raw)]


def nested(depth: int, leaf: bytes) -> bytes:
    """``depth`` multiparts one inside the other around one text/plain ``leaf``."""
    inner = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + leaf + b"\r\n"
    for level in range(depth):
        b = f"b{level}".encode()
        inner = (
            b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n'
            b"--" + b + b"\r\n" + inner + b"\r\n--" + b + b"--\r\n"
        )
    return b"MIME-Version: 1.0\r\n" + inner


def test_a_message_nested_past_the_limit_is_left_for_the_hop_to_refuse() -> None:
    """A few KB nesting hundreds of multiparts crashed the conversion (RecursionError: the
    relay retried it until it would never expire) and made it quadratic (seconds of event
    loop per level over a large body). Past MAX_NESTING it is left as it is: its 8-bit
    octets make the hop refuse it (5.6.3, RFC 6152 §3: convert or return it)."""
    shallow = downgrade(nested(MAX_NESTING - 2, "h\u00e9llo".encode()), eight_bit=False)
    assert shallow.isascii() and leaves(shallow)[-1][1] == "h\u00e9llo\r\n".encode()
    deep = nested(400, "h\u00e9llo".encode())
    started = time.monotonic()
    out = downgrade(deep, eight_bit=False)
    assert time.monotonic() - started < 5 and not out.isascii()
    assert out.endswith(deep[-200:])


def test_a_header_line_is_never_broken_inside_a_utf8_character() -> None:
    """RFC 6532 §3.2: a header broken with CRLF SP for want of white space stays UTF-8."""
    head = ("Subject: x" + "\u00e9" * 600 + "\r\n").encode()
    folded = fold_header(head)
    assert max(map(len, folded.split(b"\r\n"))) <= MAX_LINE
    folded.decode("utf-8")  # no character cut in two
    assert folded.replace(b"\r\n ", b"") == head


def test_a_comment_in_the_encoding_label_is_no_encoding() -> None:
    """RFC 2045 §6.1 with RFC 822 comments: "8bit (raw)" is 8bit; a message/rfc822 so
    labelled is walked into, never base64-encoded (RFC 2046 §5.2.1 forbids it)."""
    inner = "Subject: inner\r\n\r\nh\u00e9llo\r\n".encode()
    outer = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit (raw)\r\n\r\n"
        + inner
        + b"\r\n--B--\r\n"
    )
    out = downgrade(outer, eight_bit=False)
    assert out.isascii() and b"Subject: inner" in out and b"base64" not in out


@given(
    st.lists(st.sampled_from([0, 1, 997, 998, 999, 5000]), max_size=40),
    st.sampled_from([b"\r\n", b"\n"]),
    st.integers(1, 3000),
)
def test_a_long_line_is_found_in_pieces_as_in_the_whole(
    lengths: list[int], line_end: bytes, scan: int
) -> None:
    # Read a piece at a time (a whole split of 20 million empty lines took 160 MB), with
    # the pieces' size varied so that lines straddle every kind of cut.
    data = line_end.join(b"x" * n for n in lengths)
    whole = max(map(len, data.split(line_end))) > MAX_LINE
    saved = mime_downgrade._SCAN
    mime_downgrade._SCAN = scan
    try:
        assert has_long_line(data, line_end) is whole
    finally:
        mime_downgrade._SCAN = saved


def _mixed(*parts: bytes, preamble: bytes = b"") -> bytes:
    head = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="bnd"\r\n\r\n'
    return head + preamble + b"".join(b"--bnd\r\n" + p for p in parts) + b"--bnd--\r\n"


def test_encoding_never_makes_a_delimiter_line() -> None:
    """RFC 2046 §5.1.1: a soft line break put "--bnd", held mid-line by the text, first on a
    line: a delimiter, which cut the part in two (or ended the multipart there)."""
    text = b"x" * 28 + "é".encode() * 20
    part = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    for tail in (b"--bnd", b"--bnd--", b"-- signed"):
        raw = _mixed(part + text + tail + b"\r\nsecond line\r\n", part + b"two\r\n")
        out = downgrade(raw, eight_bit=False)
        assert out.isascii() and leaves(out) == leaves(raw), tail
        assert len(leaves(out)) == 2
    preamble = b"p" * MAX_LINE + b"--bnd\r\n"  # wrapped at 998, the rest began a line
    raw = _mixed(part + b"one " + LONG + b"\r\n", preamble=preamble)
    assert b"\r\n--bnd\r\n--bnd\r\n" not in downgrade(raw, eight_bit=False)


def test_quoted_printable_lines_are_at_most_76_characters() -> None:
    """RFC 2045 §6.7 rule 5. binascii wrote 77 for a line ending in white space near the end."""
    for text in (b"a" * 74 + b" ", b"a" * 74 + b"\t", b"a" * 75 + b" ", "é".encode() * 60):
        raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"\r\n\xc3\xa9nd\r\n"
        out = downgrade(raw, eight_bit=False)
        assert b"quoted-printable" in out and leaves(out) == leaves(raw)
        assert max(map(len, lines(body_of(out)))) <= 76, out


def test_a_message_type_other_than_rfc822_is_never_encoded() -> None:
    """RFC 2045 §6.4, RFC 6532 §3.5: a delivery-status part took base64, which hid its fields
    from readers. It stays as it was (8-bit there is for the hop to refuse: 5.6.3)."""
    status = b"Reporting-MTA: dns; a.test\r\n\r\nFinal-Recipient: rfc822; j\xc3\xb6@b.test\r\n"
    raw = _mixed(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nt\xc3\xa9xt\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n" + status,
    )
    out = downgrade(raw, eight_bit=False)
    assert status in out and out.count(b"Content-Transfer-Encoding") == 1  # the text part's
    global_status = raw.replace(b"message/delivery-status", b"message/global-delivery-status")
    assert downgrade(global_status, eight_bit=False).isascii()  # RFC 6533: may be encoded


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from(
            [b"-", b"--bnd", b"--bnd--", b"a", b" ", b"\t", b"=", b"\xc3\xa9", b"\r\n"]
        ),
        max_size=400,
    ),
    cte=st.sampled_from([b"base64", b"quoted-printable", b"8bit"]),
)
def test_no_text_makes_a_delimiter_once_encoded_again(pieces: list[bytes], cte: bytes) -> None:
    """RFC 2046 §5.1.1 again: a part that came base64 or quoted-printable may hold, decoded, a
    line "--bnd"; written as quoted-printable text it was a delimiter (and hid a part, or
    showed one the sender had hidden). A line over 998 octets makes it re-encoded."""
    text = b"".join(pieces) + b"\r\n" + b"x" * 1200 + b"\r\n"
    if cte == b"base64":
        encoded = base64.b64encode(text)  # one long line
    elif cte == b"quoted-printable":
        encoded = text.replace(b"=", b"=3D").replace(b"-", b"=2D")
    else:
        encoded = text.replace(b"--bnd", b"- -bnd")  # as sent, no line can be a delimiter
        text = encoded
    part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: " + cte
    raw = _mixed(part + b"\r\n\r\n" + encoded + b"\r\n", b"Content-Type: text/plain\r\n\r\ntwo\r\n")
    out = downgrade(raw, eight_bit=False)
    assert out.isascii() and longest(out) <= 76  # (RFC 2045 §6.7; no other line is longer)
    assert leaves(out) == leaves(raw) and len(leaves(out)) == 2


def test_a_line_that_is_no_field_ends_a_parts_header_before_and_after() -> None:
    """The conversion took a part's header up to its empty line and wrote the new encoding
    field below a line that is no field, where readers had ended the header: they saw the
    quoted-printable as text (recheck probe). The line now ends the header for the conversion
    too, and what a reader decodes is the same; so for a message's own header, and a field
    name longer than a line slice (1,000) is still a field."""
    text = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"stray in part\r\n\r\nGr\xc3\xbc\xc3\x9fe \xe2\x82\xac\r\n"
    )
    raw = multipart(text, b"Content-Transfer-Encoding: 8bit\r\n")
    out = downgrade(raw, eight_bit=False)
    assert out.isascii() and leaves(out) == leaves(raw)
    top = b"Subject: x\r\nno field here\r\nX-A: 1\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
    assert leaves(downgrade(top, eight_bit=False)) == leaves(top)
    long_name = b"X-" + b"n" * 1200 + b": v\r\nSubject: x\r\n\r\nbody\r\n"
    assert mime_downgrade.fields_end(long_name) == long_name.index(b"\r\n\r\n") + 2
