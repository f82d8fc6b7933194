"""Passwords as every account store keeps them: an argon2id hash plus SCRAM-SHA-256 keys.

argon2id (argon2-cffi, RFC 9106 parameters) checks plain logins; the SCRAM keys (RFC 7677,
RFC 5802: salt, iteration count, StoredKey, ServerKey) let SCRAM clients log in without sending
the password. Neither gives the password back. A login for a user that does not exist is
checked against a dummy hash, so both cost the same time (no user enumeration by timing).
:class:`LoginCache` remembers successful logins, keyed by an HMAC with a per-process secret
(never the password), as Dovecot's auth cache does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import (
    HashingError,
    InvalidHashError,
    VerificationError,
    VerifyMismatchError,
)
from argon2.low_level import error_to_str

from postroom import passwords
from postroom.address import parse_user_address
from postroom.errors import AccountError, AddressError, PasswordUncheckable
from postroom.sasl import SCRAM_ITERATIONS, ScramKeys, derive_scram_keys

_HASHER = PasswordHasher()
# libargon2 could not run (argon2.h: ARGON2_MEMORY_ALLOCATION_ERROR, ARGON2_THREAD_FAIL), as
# argon2-cffi words it in a VerificationError
_CANNOT_RUN = frozenset(map(error_to_str, (-22, -33)))


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user does not exist, so both cases cost the same time.
    Made on first use (an argon2 hash costs each admin command a fifth of a second); each
    server worker makes it in a thread as it starts, so that its first unknown login costs
    what the others do."""
    return _HASHER.hash("postroom-no-such-user")


def warm_up() -> None:
    """Make :func:`dummy_hash` ahead of the first login; one that cannot be made now (argon2
    short of memory) is left to the first login, which answers "try again" if it fails too."""
    with contextlib.suppress(HashingError, MemoryError):
        dummy_hash()


LOGIN_CACHE_SIZE = 50_000
LOGIN_CACHE_TIME = 300.0
_CACHE_SECRET = os.urandom(32)


@dataclass(frozen=True)
class Credentials:
    """What a store keeps for one password."""

    password_hash: str
    scram: ScramKeys


def make_credentials(password: str) -> Credentials:
    """Hash a new password (slow on purpose: argon2id and PBKDF2); AccountError if RFC 8265
    refuses it."""
    try:
        prepared = passwords.prepare(password)
    except passwords.PasswordError as exc:
        raise AccountError(str(exc)) from None
    # Side by side: both release the GIL, so the costs overlap (0.39 s to 0.29 s here).
    with ThreadPoolExecutor(1) as pool:
        scram = pool.submit(make_scram_keys, password, prepared)
        password_hash = _HASHER.hash(prepared)
        return Credentials(password_hash, scram.result())


def make_scram_keys(password: str, prepared: str) -> ScramKeys:
    """The SCRAM-SHA-256 keys of a password (``prepared``: its RFC 8265 form), of a new salt
    and today's iteration count."""
    forms = _scram_forms(password, prepared)
    salt = secrets.token_bytes(16)
    with ThreadPoolExecutor(len(forms)) as pool:
        keys = list(pool.map(lambda form: derive_scram_keys(form, salt), forms))
    return dataclasses.replace(
        keys[0],
        stored_key=b"".join(k.stored_key for k in keys),
        server_key=b"".join(k.server_key for k in keys),
    )


def _scram_forms(password: str, prepared: str) -> list[str]:
    """The forms of a password that SCRAM keys are kept for, each once."""
    # SCRAM clients hash the password themselves: GNU SASL (msmtp, neomutt) its SASLprep
    # form, as RFC 5802 §2.2 says, NFKC ("²" is "2"); Cyrus SASL (Postfix, sendmail, mutt)
    # as it is typed. Where the forms differ (ours, RFC 8265's, too), keys for each, of one
    # salt: whichever a client hashes logs in.
    forms = [prepared, password]
    with contextlib.suppress(passwords.PasswordError):  # (an emoji: SASLprep refuses it)
        forms.insert(0, passwords.saslprep(password))
    return list(dict.fromkeys(forms))


def scram_renewable(keys: ScramKeys, password: str) -> bool:
    """Should ``keys`` be made again from ``password``, just verified by a plain login (the
    only moment it is known)? When they have another iteration count than today's (before
    65,536, 600,000, which Cyrus SASL clients refuse, and which told a real account from an
    unknown one, whose made-up keys have today's), and both the password given at ``user
    add`` (one pair of keys: one form) and this one have a single form: then they are the
    same string. Of a password with several forms ("é" composed or not, a no-break space, a
    Kelvin sign for a K), another typing may have been the one given then, and keys of this
    one's forms only would lock out a client that hashes that one."""
    if keys.iterations == SCRAM_ITERATIONS or len(keys.stored_key) != _KEY_SIZE:
        return False
    try:
        prepared = passwords.prepare(password)
    except passwords.PasswordError:
        return False
    return len(_scram_forms(password, prepared)) == 1


_KEY_SIZE = 32  # octets of one StoredKey (SHA-256); a store keeps one per form


def password_matches(stored: str | None, password: str) -> bool:
    """True if ``password`` matches the argon2 hash ``stored``; None (no such user), or a
    password that preparation refuses (it cannot be anyone's), costs a verification all the
    same and is False."""
    try:
        password = passwords.prepare(password)
    except passwords.PasswordError:
        stored = None
    try:
        ok: bool = _HASHER.verify(stored or dummy_hash(), password)
    except HashingError as exc:  # the dummy hash could not be made: the same shortage
        raise PasswordUncheckable(str(exc)) from exc
    except (VerifyMismatchError, InvalidHashError):
        ok = False
    except MemoryError:  # ours, before or after libargon2's own allocation
        raise PasswordUncheckable("out of memory") from None
    except VerificationError as exc:
        # argon2-cffi raises this base class for every other libargon2 error: a hash it
        # cannot decode (nobody's password matches it), or its own failure to run, which is
        # the server's and no wrong password.
        if str(exc) in _CANNOT_RUN:
            raise PasswordUncheckable(str(exc)) from exc
        ok = False
    return ok and stored is not None


def login_key(login: str) -> str | None:
    """The account key a login names (:attr:`Address.key`), or None if it is no address. A
    login comes from the network as it was typed: one with white space around it, or a
    control or line separator in it, names no account (RFC 8265 §3.3: a user name has no
    space nor control), where an admin's typing is forgiven its stray spaces."""
    if login != login.strip() or not login.isprintable():
        return None
    try:
        return parse_user_address(login).key
    except AddressError:
        return None


class LoginCache:
    """Successful logins, valid while the account's stored hash is the one they were checked
    against, and for at most ``LOGIN_CACHE_TIME``: a client that logs in for every message
    costs one argon2 run, not one per message. The hash is read at every login (one indexed
    look): a cache valid while the store's files looked unchanged took a login checked in
    the instant between a password change's write and its commit for the new state, and the
    old password went on working for five minutes."""

    def __init__(self) -> None:
        self._hits: dict[bytes, tuple[str, str, float]] = {}

    @staticmethod
    def token(login: str, password: str) -> bytes:
        return hmac.new(_CACHE_SECRET, f"{login}\0{password}".encode(), "sha256").digest()

    def verify(
        self, login: str, password: str, stored_hash: Callable[[str], str | None]
    ) -> str | None:
        """The account key when ``password`` is right for ``login``, else None; a hit costs
        no argon2 run, a miss one verification whether or not the user exists
        (:func:`password_matches`). ``stored_hash`` reads an account's argon2 hash (None: no
        such user)."""
        key = login_key(login)
        stored = stored_hash(key) if key is not None else None
        token = self.token(login, password)
        hit = self._hits.get(token)
        if hit is not None and hit[:2] == (key, stored) and time.monotonic() < hit[2]:
            return key
        if key is None or not password_matches(stored, password) or stored is None:
            return None
        if len(self._hits) > LOGIN_CACHE_SIZE:
            self._hits.clear()
        self._hits[token] = (key, stored, time.monotonic() + LOGIN_CACHE_TIME)
        return key
