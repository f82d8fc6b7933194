"""storage/local/dovecot_import.py: dovecot-uidlist and pop3_uidl_format (pure parts)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.errors import ImportSourceError
from postroom.storage.local.dovecot_import import Uidlist, format_uidl, parse_uidlist


def test_parse_v3() -> None:
    text = (
        "3 V1700000000 N5 G4a6b2c\n"
        "1 :1700000001.M1P1.host,S=10,W=12\n"
        "2 P1700000002.old:x W99 GAbc :1700000002.M2P1.host\n"
        "4 1700000004.M4P1.host\n"
    )
    ul = parse_uidlist(text)
    assert (ul.version, ul.uidvalidity, ul.next_uid) == (3, 1700000000, 5)
    assert [e.uid for e in ul.entries] == [1, 2, 4]
    assert ul.entries[0].filename == "1700000001.M1P1.host,S=10,W=12"
    assert ul.entries[1].ext == {"P": "1700000002.old:x", "W": "99", "G": "Abc"}
    assert ul.entries[1].filename == "1700000002.M2P1.host"
    assert ul.entries[2].filename == "1700000004.M4P1.host"


def test_odd_digits_are_no_uid() -> None:
    assert parse_uidlist("3 V1\n\u00b2 :x\n1 :y\n").entries[0].filename == "y"


def test_parse_v1() -> None:
    ul = parse_uidlist("1 1234 3\n1 a.b.c\n2 d.e.f\n")
    assert (ul.version, ul.uidvalidity, ul.next_uid) == (1, 1234, 3)
    assert [(e.uid, e.filename) for e in ul.entries] == [(1, "a.b.c"), (2, "d.e.f")]


@pytest.mark.parametrize("text", ["", "9 V1\n", "3 N5\n", "1 x 2\n", "V1 N2\n"])
def test_bad_headers(text: str) -> None:
    with pytest.raises(ImportSourceError):
        parse_uidlist(text)


@given(st.text(max_size=200))
def test_garbage_parses_or_is_refused(text: str) -> None:
    with contextlib.suppress(ImportSourceError):
        assert isinstance(parse_uidlist(text), Uidlist)


def test_format_uidl() -> None:
    assert format_uidl("%08Xu%08Xv", 1, 1700000000, "f", None) == "000000016553f100"
    assert format_uidl("%u-%v", 7, 9, "f", None) == "7-9"
    assert format_uidl("%f", 7, 9, "1700.M1.host", None) == "1700.M1.host"
    assert format_uidl("%g", 7, 9, "base", "guid1") == "guid1"
    assert format_uidl("%g", 7, 9, "base", None) == "base"
    assert format_uidl("%{uid}x%{uidvalidity}%%", 2, 3, "f", None) == "2x3%"
    assert format_uidl("%UXv", 1, 255, "f", None) == "FF"
    with pytest.raises(ImportSourceError):
        format_uidl("%m", 1, 1, "f", None)  # the header MD5: mbox only
    with pytest.raises(ImportSourceError):
        format_uidl("%q", 1, 1, "f", None)
