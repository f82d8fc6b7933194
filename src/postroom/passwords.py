"""Passwords as users type them: RFC 8265 OpaqueString preparation, SASLprep for SCRAM, and
the minimum length.

The same password typed on two keyboards can arrive as different code points (a precomposed
"é" or "e" plus a combining accent, a no-break space for a space). RFC 8265 §4.2's
OpaqueString profile maps non-ASCII spaces to U+0020, normalises to NFC and refuses control
and unassigned characters. The password is prepared when it is set (``user add``/``passwd``:
the argon2 hash is made from the prepared string) and again at every PLAIN, LOGIN and
USER/PASS login, so both spellings log in. The profile comes from ``precis-i18n``, which
implements the PRECIS framework (RFC 8264) and its Unicode tables for the running Python;
writing that by hand would mean keeping those tables.

SCRAM clients prepare the password themselves: GNU SASL (msmtp, neomutt) with what RFC 5802
§2.2 names, SASLprep (RFC 4013), NFKC rather than NFC; Cyrus SASL not at all. SCRAM keys are
made from each form (:func:`saslprep`; see ``credentials.make_credentials``), or a password
with "²" or "ﬁ" logs in with PLAIN and not with SCRAM. No maintained library offers SASLprep;
it is a few lines over the standard library's ``stringprep`` tables (RFC 3454) and its
Unicode 3.2 NFKC.

Pure: no I/O.
"""

from __future__ import annotations

import stringprep
import unicodedata

from precis_i18n import get_profile

# Counted as code points, after preparation. NIST SP 800-63B §5.1.1.2 asks for 8; postroom
# takes 6 as its floor because online guessing is throttled and locked out (throttle.py) and
# stolen hashes are argon2id: 6 refuses the trivial passwords without breaking the scripts and
# clients of installs whose users chose 6 or 7. `--allow-short` accepts shorter ones.
MIN_LENGTH = 6
# SMTP AUTH PLAIN takes a response line of 12,288 octets (RFC 4954 §4 asks for that much),
# base64 of about 9,000, and POP3 PASS far less: a longer password could never log in with
# them, and is the wrong file piped in.
MAX_LENGTH = 4096

_OPAQUE = get_profile("OpaqueString")


class PasswordError(ValueError):
    """The password cannot be used (disallowed characters, too short)."""


def prepare(password: str) -> str:
    """The OpaqueString form of ``password`` (RFC 8265 §4.2); PasswordError if it has
    characters the profile disallows (controls, unassigned code points) or is empty."""
    try:
        prepared: str = _OPAQUE.enforce(password)
    except UnicodeError as exc:
        reason = getattr(exc, "reason", str(exc))
        raise PasswordError(f"the password cannot be used: {reason}") from None
    return prepared


def saslprep(password: str) -> str:
    """``password`` prepared as RFC 4013 (SASLprep) has it for a stored string: what SCRAM
    clients hash (RFC 5802 §2.2). PasswordError if the profile refuses it (a prohibited or
    unassigned character, a bidi mix)."""
    # §2.1: non-ASCII spaces become a space (C.1.2 first for one in both tables, as libidn,
    # which GNU SASL uses); the "commonly mapped to nothing" characters go (B.1).
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c
        for c in password
        if stringprep.in_table_c12(c) or not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)  # §2.2
    for c in prepared:
        if _prohibited(c):  # §2.3, and §2.5: unassigned code points in a stored string
            raise PasswordError(f"SASLprep refuses the character U+{ord(c):04X}")
    # §2.4: RFC 3454 §6, bidirectional text
    if any(map(stringprep.in_table_d1, prepared)) and (
        any(map(stringprep.in_table_d2, prepared))
        or not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1]))
    ):
        raise PasswordError("SASLprep refuses the mix of right-to-left and left-to-right text")
    return prepared


def _prohibited(c: str) -> bool:
    return (
        stringprep.in_table_c12(c)
        or stringprep.in_table_c21_c22(c)
        or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c)
        or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c)
        or stringprep.in_table_c9(c)
        or stringprep.in_table_a1(c)
    )


def check_new(password: str, allow_short: bool = False) -> str:
    """A password being set: prepared, at least :data:`MIN_LENGTH` characters unless
    ``allow_short``, and at most :data:`MAX_LENGTH`."""
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"the password is longer than {MAX_LENGTH} characters")
    prepared = prepare(password)
    if len(prepared) < MIN_LENGTH and not allow_short:
        raise PasswordError(
            f"the password is shorter than {MIN_LENGTH} characters (--allow-short to accept it)"
        )
    return prepared
