"""Passwords as users type them: RFC 8265 OpaqueString preparation, and the minimum length.

The same password typed on two keyboards can arrive as different code points (a precomposed
"é" or "e" plus a combining accent, a no-break space for a space). RFC 8265 §4.2's
OpaqueString profile maps non-ASCII spaces to U+0020, normalises to NFC and refuses control
and unassigned characters; it is what RFC 7677 (SCRAM-SHA-256) asks for through SASLprep's
successor. The password is prepared when it is set (``user add``/``passwd``: the argon2 hash
and the SCRAM keys are made from the prepared string) and again at every PLAIN, LOGIN and
USER/PASS login, so both spellings log in. SCRAM clients prepare it themselves. The profile
comes from ``precis-i18n``, which implements the PRECIS framework (RFC 8264) and its Unicode
tables for the running Python; writing that by hand would mean keeping those tables.

Pure: no I/O.
"""

from __future__ import annotations

from precis_i18n import get_profile

# Counted as code points, after preparation. NIST SP 800-63B §5.1.1.2 asks for 8; postroom
# takes 6 as its floor because online guessing is throttled and locked out (throttle.py) and
# stolen hashes are argon2id: 6 refuses the trivial passwords without breaking the scripts and
# clients of installs whose users chose 6 or 7. `--allow-short` accepts shorter ones.
MIN_LENGTH = 6

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


def check_new(password: str, allow_short: bool = False) -> str:
    """A password being set: prepared, and at least :data:`MIN_LENGTH` characters unless
    ``allow_short``."""
    prepared = prepare(password)
    if len(prepared) < MIN_LENGTH and not allow_short:
        raise PasswordError(
            f"the password is shorter than {MIN_LENGTH} characters (--allow-short to accept it)"
        )
    return prepared
