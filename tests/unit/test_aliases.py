"""The alias expansion rule (pure): recursion, self-reference, loops, catch-all, postmaster."""

from __future__ import annotations

import functools

import pytest

from postroom.address import parse_user_address
from postroom.errors import AccountError, AddressError
from postroom.storage.aliases import account_address, check_targets, expand, owns, resolve

USERS = {"ann@a.test", "bob@a.test", "carol@a.test"}


def expander(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    return functools.partial(
        expand,
        targets_of=lambda k: table.get(k, []),
        is_user=USERS.__contains__,
        local_domains={"a.test"},
    )


def test_users_aliases_and_nothing() -> None:
    ex = expander({"team@a.test": ["sales@a.test", "bob@a.test"], "sales@a.test": ["ann@a.test"]})
    assert ex("ann@a.test") == ["ann@a.test"]
    assert ex("team@a.test") == ["ann@a.test", "bob@a.test"]
    assert ex("nobody@a.test") is None


def test_self_reference_loops_and_targets_without_account() -> None:
    ex = expander(
        {
            "ann@a.test": ["ann@a.test", "x@remote.test"],
            "l1@a.test": ["l2@a.test"],
            "l2@a.test": ["l1@a.test"],
            "old@a.test": ["gone@a.test", "bob@a.test"],
        }
    )
    assert ex("ann@a.test") == ["ann@a.test", "x@remote.test"]
    assert ex("l1@a.test") == []  # refused by the caller (alias loop)
    assert ex("old@a.test") == ["bob@a.test"]  # no mail for an address without an account


def test_catch_all_takes_the_rest_but_not_postmaster_nor_sending() -> None:
    ex = expander({"@a.test": ["bob@a.test"]})
    assert resolve("whoever@a.test", ex) == ["bob@a.test"]
    assert resolve("ann@a.test", ex) == ["ann@a.test"]
    assert resolve("postmaster@a.test", ex) == ["postmaster@a.test"]
    assert resolve("whoever@b.test", ex) is None
    assert not owns("bob@a.test", "whoever@a.test", ex("whoever@a.test"))
    assert owns("bob@a.test", "bob@a.test", None)


def test_a_forward_of_a_user_does_not_give_away_their_address() -> None:
    """ann keeps a copy and forwards to carol: carol gets ann's mail, not ann's address."""
    ex = expander({"ann@a.test": ["ann@a.test", "carol@a.test"], "team@a.test": ["carol@a.test"]})
    assert owns("carol@a.test", "team@a.test", ex("team@a.test"), sender_is_user=False)
    assert not owns("carol@a.test", "ann@a.test", ex("ann@a.test"), sender_is_user=True)
    assert owns("ann@a.test", "ann@a.test", ex("ann@a.test"), sender_is_user=True)


def test_aliases_nested_too_deep_are_refused_whole_not_a_branch_dropped() -> None:
    chain = {f"d{i}@a.test": [f"d{i + 1}@a.test"] for i in range(12)}
    chain["d12@a.test"] = ["ann@a.test"]
    chain["fan@a.test"] = ["d0@a.test", "bob@a.test"]
    ex = expander(chain)
    assert ex("fan@a.test", max_depth=20) == ["ann@a.test", "bob@a.test"]
    assert ex("d0@a.test", max_depth=12) == ["ann@a.test"]  # 13 aliases: d0 at depth 0
    assert ex("d0@a.test", max_depth=11) == []  # refused (5.4.6), never half delivered
    assert ex("fan@a.test", max_depth=11) == []


def test_postmaster_is_accepted_even_when_its_alias_leads_nowhere() -> None:
    loop = expander({"postmaster@a.test": ["pm2@a.test"], "pm2@a.test": ["postmaster@a.test"]})
    assert resolve("postmaster@a.test", loop) == ["postmaster@a.test"]  # RFC 5321 §4.5.1
    gone = expander({"postmaster@a.test": ["gone@a.test"]})
    assert resolve("postmaster@a.test", gone) == ["postmaster@a.test"]
    ok = expander({"postmaster@a.test": ["bob@a.test"]})
    assert resolve("postmaster@a.test", ok) == ["bob@a.test"]


def test_an_admin_cannot_make_an_account_no_mail_can_name() -> None:
    """A name that is not UTF-8 (argv's surrogateescape) is malformed, not a traceback; an
    address longer than a path (RFC 5321 §4.5.3.1.3) could never be used in RCPT or MAIL."""
    long_domain = ".".join(["m" * 61] * 3) + ".test"  # 190 octets
    with pytest.raises(AccountError, match="malformed"):
        account_address("\udcff\udcfe@a.test", ["a.test"])
    with pytest.raises(AddressError):  # an alias target
        parse_user_address("x\udcff@remote.test")
    with pytest.raises(AccountError, match="longer than a path"):
        account_address("u" * 64 + "@" + long_domain, [long_domain])
    assert account_address("u" * 63 + "@" + long_domain, [long_domain]).local == "u" * 63


def test_no_line_end_or_invisible_character_gets_into_an_address() -> None:
    """A local part ending in LF passed (``$`` matches before a final newline): the account
    got a Maildir, ``user list`` a line of its own, and a remote alias target went out as
    ``RCPT TO:<x`` LF ``@remote.test>``. Zero-width, right-to-left, line and no-break spaces
    made accounts that look like others (cliadv probe)."""
    invisible = ("a\u200bb", "a\u202eb", "a\u2028b", "a\u00a0b", "\u3164x", "\uffa0x", "\u2800x")
    # (and recheck2's: a joiner, a vowel that is never written, a variation selector, a
    # fullwidth letter beside its own, combining marks alone, a symbol)
    others = ("a\u034fb", "a\u17b4b", "a\ufe0fb", "\uff58", "\u0301\u0301", "\U0001f642x")
    for local in ("nl\n", "nl\r\n", *invisible, *others):
        with pytest.raises(AccountError, match="malformed"):
            account_address(f"{local}@a.test", ["a.test"])
    with pytest.raises(AddressError):  # an alias target
        parse_user_address("x\n@remote.test")
    for local in ("δοκιμή", "日本", "josé", "jürgen", "a!#$%&*+-=?^_`{|}~b"):
        assert account_address(f"{local}@a.test", ["a.test"]).local == local


def test_a_utf8_local_part_is_one_account_however_it_is_composed() -> None:
    """RFC 6532 §3.1: UTF-8 in NFC. ``jürgen`` precomposed and decomposed were two accounts
    that look alike, each with its own Maildir, mail and logins split between them."""
    from postroom.address import AddressError, parse_path, safe_local_part
    from postroom.storage.credentials import login_key

    nfc, nfd = "j\u00fcrgen", "ju\u0308rgen"
    key = account_address(f"{nfc}@a.test", ["a.test"]).key
    assert account_address(f"{nfd.upper()}@a.test", ["a.test"]).key == key
    assert login_key(f"{nfd}@a.test") == key
    path = parse_path(f"<{nfd}@a.test>", utf8=True)
    assert path is not None and path.key == key
    assert safe_local_part(nfd) == safe_local_part(nfc)
    # (an i18n probe: 64 octets were counted in the spelling given, so a decomposed name of
    # 50 octets precomposed, 75 decomposed, could neither log in nor be added)
    for control in ("\u0085", "\u009b", "\u2028", "\u2029"):  # (NEL reached Return-Path)
        with pytest.raises(AddressError):
            parse_path(f"<a{control}b@a.test>", utf8=True)
    long_nfc, long_nfd = "\u00fc" * 25, "u\u0308" * 25
    long_key = account_address(f"{long_nfc}@a.test", ["a.test"]).key
    assert account_address(f"{long_nfd}@a.test", ["a.test"]).key == long_key
    assert login_key(f"{long_nfd}@a.test") == long_key


def test_an_alias_that_lists_itself_without_a_mailbox_is_told_why() -> None:
    """``alias add team@ team@`` of an alias that is no user said "is no user or alias here"
    of an alias that exists (cliadv probe)."""
    users = {"bob@a.test"}
    aliases = {"team@a.test"}
    with pytest.raises(AccountError, match="may list itself only if it is a user too"):
        check_targets(
            "team@a.test", ["team@a.test"], {"a.test"}, users.__contains__, aliases.__contains__
        )
    assert check_targets(
        "bob@a.test", ["bob@a.test"], {"a.test"}, users.__contains__, aliases.__contains__
    ) == ["bob@a.test"]
