"""storage/local/dovecot_import.py: dovecot-uidlist and pop3_uidl_format (pure parts), and
imports run twice."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.errors import ImportSourceError
from postroom.storage.local.dovecot_import import (
    Uidlist,
    format_uidl,
    import_maildir,
    load_uidl_map,
    parse_uidlist,
)


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


def _pop3_view(box: Path) -> dict[bytes, str]:
    """Each message's body -> the UIDL postroom's POP3 gives it."""
    from postroom.storage.local.maildrop import unique_id

    kept = load_uidl_map(box)
    out = {}
    for sub in ("cur", "new"):
        for name in os.listdir(box / sub):
            body = (box / sub / name).read_bytes().split(b"\n\n", 1)[1]
            assert body not in out, f"{body!r} imported twice"
            out[body] = kept.get(unique_id(name), unique_id(name))
    return out


def test_a_second_run_after_dovecot_listed_more_copies_each_once_with_its_uidl(
    tmp_path: Path,
) -> None:
    """The first run met two messages Dovecot had not listed; Dovecot then numbered them in
    another order than their names. Copies are known by source name, never by a guessed UID:
    each once, with the UIDL Dovecot gave it (a client may have fetched it from Dovecot)."""
    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    (src / "cur" / "1700000001.a.vm:2,S").write_bytes(b"Subject: a\n\nA\n")
    (src / "new" / "1700000003.late.vm").write_bytes(b"Subject: late\n\nLATE\n")
    (src / "dovecot-uidlist").write_text("3 V1700000000 N2\n1 :1700000001.a.vm\n")
    first = import_maildir(src, box, "mx.a.test")
    assert (first.imported, first.unlisted) == (2, 1)
    (src / "new" / "1700000002.early.vm").write_bytes(b"Subject: early\n\nEARLY\n")
    (src / "dovecot-uidlist").write_text(
        "3 V1700000000 N4\n1 :1700000001.a.vm\n2 :1700000002.early.vm\n3 :1700000003.late.vm\n"
    )
    second = import_maildir(src, box, "mx.a.test")
    assert (second.imported, second.skipped) == (1, 2)
    assert _pop3_view(box) == {
        b"A\n": format_uidl("%08Xu%08Xv", 1, 1700000000, "", None),
        b"EARLY\n": format_uidl("%08Xu%08Xv", 2, 1700000000, "", None),
        b"LATE\n": format_uidl("%08Xu%08Xv", 3, 1700000000, "", None),
    }


def test_a_second_run_without_a_uidlist_copies_nothing_twice(tmp_path: Path) -> None:
    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    for stamp, name in ((1700000001, "A"), (1700000002, "B"), (1700000003, "C")):
        (src / "new" / f"{stamp}.{name}.vm").write_bytes(f"Subject: {name}\n\n{name}\n".encode())
    assert import_maildir(src, box, "mx.a.test").imported == 3
    (src / "new" / "1700000001.A.vm").unlink()  # the oldest gone: its time named the copies
    (src / "new" / "1700000004.D.vm").write_bytes(b"Subject: D\n\nD\n")
    again = import_maildir(src, box, "mx.a.test")
    assert (again.imported, again.skipped) == (1, 2)
    assert sorted(_pop3_view(box)) == [b"A\n", b"B\n", b"C\n", b"D\n"]


def test_a_copy_deleted_between_two_runs_stays_deleted(tmp_path: Path) -> None:
    """deploy.md imports once early and once at the switch: a message a user fetched and
    deleted from postroom in between must not come back with the second run."""
    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    (src / "cur" / "1700000001.a.vm:2,S").write_bytes(b"Subject: a\n\nA\n")
    (src / "cur" / "1700000002.b.vm:2,S").write_bytes(b"Subject: b\n\nB\n")
    uidlist = "3 V1700000000 N3\n1 :1700000001.a.vm\n2 :1700000002.b.vm\n"
    (src / "dovecot-uidlist").write_text(uidlist)
    assert import_maildir(src, box, "mx.a.test").imported == 2
    (a_copy,) = [p for p in (box / "cur").iterdir() if p.read_bytes().endswith(b"\nA\n")]
    a_copy.unlink()  # RETR, DELE, QUIT over POP3
    again = import_maildir(src, box, "mx.a.test")
    assert (again.imported, again.skipped) == (0, 2)
    assert sorted(_pop3_view(box)) == [b"B\n"]


def test_a_kept_uidl_that_rfc_1939_forbids_is_served_hashed(tmp_path: Path) -> None:
    from postroom.blocking import BlockingPool
    from postroom.storage.local.maildrop import MaildirMaildrop

    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    (src / "cur" / "1700000001.a.vm:2,S").write_bytes(b"Subject: a\n\nA\n")
    (src / "cur" / "1700000002.b.vm:2,S").write_bytes(b"Subject: b\n\nB\n")
    (src / "cur" / "1700000003.c.vm:2,S").write_bytes(b"Subject: c\n\nC\n")
    long_p, utf8_p = "x" * 80, "caf\u00e9"
    (src / "dovecot-uidlist").write_text(
        f"3 V1700000000 N4\n1 P{long_p} :1700000001.a.vm\n2 P{utf8_p} :1700000002.b.vm\n"
        f"3 P{long_p} :1700000003.c.vm\n"  # the same P twice
    )
    import_maildir(src, box, "mx.a.test")
    drop = MaildirMaildrop(box, BlockingPool())
    drop.open_now()
    uidls = [f.uid for f in drop.files]
    drop.close_now()
    assert len(uidls) == 3 and len(set(uidls)) == 3
    for uid in uidls:  # RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E
        assert 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)


def test_a_uidlist_naming_a_file_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """File names are bytes: one that is no UTF-8 in dovecot-uidlist was a traceback."""
    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    name = os.fsdecode(b"1700000001.\xff.vm")
    (src / "cur" / name).write_bytes(b"Subject: a\n\nA\n")
    (src / "dovecot-uidlist").write_bytes(b"3 V1700000000 N2\n1 :1700000001.\xff.vm\n")
    assert import_maildir(src, box, "mx.a.test").imported == 1
    assert _pop3_view(box) == {b"A\n": format_uidl("%08Xu%08Xv", 1, 1700000000, "", None)}


@pytest.mark.parametrize("host", ["mx.a.test", "mx1.mail-gateway.long-company-name.example.com"])
def test_a_long_hostname_keeps_the_uidls_dovecot_gave(tmp_path: Path, host: str) -> None:
    # The copies' names pass 70 characters with a hostname of 36 or more (an EC2 host's):
    # their own UIDLs are hashed, and the map, keyed by name, was looked up by that hash.
    # Every POP3 client fetched the whole mailbox again.
    from postroom.blocking import BlockingPool
    from postroom.storage.local.maildrop import MaildirMaildrop

    src, box = tmp_path / "src", tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    (src / "cur" / "1700000001.a.vm:2,S").write_bytes(b"Subject: a\n\nA\n")
    (src / "dovecot-uidlist").write_text("3 V1700000000 N2\n1 :1700000001.a.vm\n")
    assert import_maildir(src, box, host).imported == 1
    drop = MaildirMaildrop(box, BlockingPool(1))
    drop.open_now()
    try:
        assert [f.uid for f in drop.files] == [format_uidl("%08Xu%08Xv", 1, 1700000000, "", None)]
    finally:
        drop.close_now()
