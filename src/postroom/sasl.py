"""SASL server mechanisms as pure challenge-response steps (used by SMTP AUTH and POP3 AUTH).

PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login, what Outlook and many phones send) and
SCRAM-SHA-256 (RFC 5802, RFC 7677). Each mechanism is an object fed the client's decoded
responses; it answers with a :class:`Challenge` to send, :class:`CheckPassword` (PLAIN, LOGIN:
the caller verifies the argon2 hash), :class:`NeedScramKeys` (the caller looks the user up),
:class:`Success` or :class:`Failure`. No I/O: written by hand because the Python SASL libraries
are client-side or bound to Cyrus, and the steps are short.

Security: for an unknown user SCRAM continues with made-up keys, so the exchange looks the same
and fails only at the proof (no user enumeration). The made-up salt is as stable as a real one:
derived from the account store's own secret (the same on every node and after every restart;
one made per process told anyone who compared two answers which accounts exist).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from postroom.address import parse_user_address
from postroom.errors import AddressError

MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
# PBKDF2-HMAC-SHA256 rounds for new SCRAM keys: what a stolen account store costs per guess.
# RFC 7677 §4 sets 4096 as a floor. The ceiling is the clients': Cyrus SASL (Postfix's SMTP
# client, sendmail, mutt) refuses a count over 65,536 (MAX_ITERATION_COUNTER) and, having
# picked SCRAM as the strongest mechanism offered, does not fall back to PLAIN. The server pays
# the rounds once per ``user add``/``passwd``; at a SCRAM login the *client* does, the server
# only two HMACs. Keys made with another count keep theirs (it travels in the server-first
# message) until passwd.
SCRAM_ITERATIONS = 65_536
_KEY = 32  # octets of a StoredKey, a ServerKey, a proof (SHA-256)


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What the server stores for SCRAM-SHA-256 (RFC 5802 §3). ``stored_key`` and
    ``server_key`` hold 32 octets per form of the password a client may hash (see
    ``credentials.make_credentials``): one pair, or up to three of one salt side by side."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def derive_scram_keys(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> ScramKeys:
    """SaltedPassword, ClientKey, StoredKey and ServerKey of RFC 5802 §3 with SHA-256."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return ScramKeys(salt, iterations, hashlib.sha256(client_key).digest(), server_key)


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class NeedScramKeys:
    username: str


@dataclass(frozen=True, slots=True)
class Success:
    """Authenticated as ``username``; ``final`` is data to send before success (SCRAM) or None."""

    username: str
    final: bytes | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    malformed: bool = False
    username: str | None = None  # who tried, when known (for the per-account throttle)


Step = Challenge | CheckPassword | NeedScramKeys | Success | Failure


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Plain:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one response."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return Failure("malformed PLAIN response", malformed=True)
        authzid, authcid, passwd = (_utf8(p) for p in parts)
        if authzid is None or authcid is None or passwd is None or not authcid:
            return Failure("malformed PLAIN response", malformed=True)
        # We do not allow acting as somebody else: authzid must be empty or the same user.
        if authzid and not same_account(authzid, authcid):
            return Failure("authorization identity not allowed", username=authcid)
        return CheckPassword(authcid, passwd)


class Login:
    """The LOGIN mechanism: username and password in two base64 responses."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"Username:") if initial is None else self.step(initial)

    def step(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return Failure("malformed LOGIN response", malformed=True)
        if self._user is None:
            self._user = text
            return Challenge(b"Password:")
        return CheckPassword(self._user, text)


def same_account(name: str, other: str) -> bool:
    """Do two login names name one account, as logins are matched (``Address.key``: any case,
    an IDNA domain in either form, needless quotes or a trailing dot)?"""
    if name.lower() == other.lower():
        return True
    try:
        return parse_user_address(name).key == parse_user_address(other).key
    except AddressError:
        return False


def _saslname(text: str) -> str | None:
    """RFC 5802 §5.1: ``=2C`` is "," and ``=3D`` is "="; any other "=" is an error."""
    if re.search(r"=(?!2C|3D)", text):
        return None
    return text.replace("=2C", ",").replace("=3D", "=")


class ScramSha256:
    """RFC 5802 / RFC 7677 server side, without channel binding (``n,`` or ``y,``, and an
    authzid only when it names the user who logs in)."""

    name = "SCRAM-SHA-256"

    def __init__(self, decoy_secret: bytes) -> None:
        """``decoy_secret``: the account store's, for an unknown user's salt."""
        self._decoy_secret = decoy_secret
        self._stage = 0
        self._username = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._gs2 = ""
        self._keys: ScramKeys | None = None
        self._known = False

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if initial is None else self.step(initial)

    @property
    def awaiting_proof(self) -> bool:
        """The next message is the client-final, whose proof is checked against the keys."""
        return self._stage == 2

    @property
    def deciding(self) -> bool:
        """The next message is one the outcome depends on: the client-first (the keys it
        gets) or the proof; not the empty answer to the server-final (the login succeeded).
        """
        return self._stage in (0, 2)

    def step(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return Failure("malformed SCRAM message", malformed=True)
        if self._stage == 0:
            return self._client_first(text)
        if self._stage == 2:
            return self._client_final(text)
        if self._stage == 3:
            # RFC 5802 §5 with RFC 4954 §4 / RFC 5034 §4: after the server-final message the
            # client answers with an empty response; anything else ends the exchange.
            if text:
                return Failure("unexpected data after SCRAM server-final", malformed=True)
            return Success(self._username)
        return Failure("unexpected SCRAM message", malformed=True)

    def _client_first(self, text: str) -> Step:
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            return Failure("unsupported SCRAM channel binding", malformed=True)
        authzid = None
        if parts[1]:  # RFC 5802 §7: gs2-header = gs2-cbind-flag "," [ authzid ] ","
            authzid = _saslname(parts[1][2:]) if parts[1][:2] == "a=" else None
            if not authzid:
                return Failure("malformed SCRAM authzid", malformed=True)
        self._gs2 = parts[0] + "," + parts[1] + ","
        self._client_first_bare = parts[2]
        # RFC 5802 §7: client-first-message-bare = [reserved-mext ","] username "," nonce
        # ["," extensions]. A mandatory extension ("m=") we cannot know fails (§5.1).
        fields = parts[2].split(",")
        if len(fields) < 2 or fields[0][:2] != "n=" or fields[1][:2] != "r=":
            return Failure("malformed SCRAM client-first", malformed=True)
        user, cnonce = fields[0][2:], fields[1][2:]
        # RFC 5802 §7: c-nonce = printable (%x21-2B / %x2D-7E); it is echoed to the client.
        if not user or not cnonce or not all("!" <= c <= "~" for c in cnonce):
            return Failure("malformed SCRAM client-first", malformed=True)
        name = _saslname(user)
        if name is None:
            return Failure("malformed SCRAM username", malformed=True)
        # As with PLAIN: nobody acts as somebody else; an authzid names the user or nothing.
        if authzid is not None and not same_account(authzid, name):
            return Failure("authorization identity not allowed", username=name)
        self._username = name
        self._nonce = cnonce + base64.b64encode(secrets.token_bytes(18)).decode()
        self._stage = 1
        return NeedScramKeys(name)

    def provide_keys(self, keys: ScramKeys | None) -> Step:
        """Continue after :class:`NeedScramKeys`; None for an unknown user."""
        if self._stage != 1:
            raise RuntimeError("provide_keys() out of order")
        self._known = keys is not None
        if keys is None:
            salt = decoy_salt(self._decoy_secret, self._username)
            keys = ScramKeys(
                salt, SCRAM_ITERATIONS, secrets.token_bytes(32), secrets.token_bytes(32)
            )
        self._keys = keys
        self._server_first = (
            f"r={self._nonce},s={base64.b64encode(keys.salt).decode()},i={keys.iterations}"
        )
        self._stage = 2
        return Challenge(self._server_first.encode())

    def _client_final(self, text: str) -> Step:
        assert self._keys is not None
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            return Failure("malformed SCRAM client-final", malformed=True)
        attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
        if attrs.get("r") != self._nonce:
            return Failure("SCRAM nonce mismatch", username=self._username)
        expected_cbind = base64.b64encode(self._gs2.encode()).decode()
        if attrs.get("c") != expected_cbind:
            return Failure("SCRAM channel binding mismatch", username=self._username)
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            return Failure("malformed SCRAM proof", malformed=True)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        if len(proof) != _KEY:
            return Failure("bad SCRAM proof", username=self._username)
        matched = -1
        for at in range(0, len(self._keys.stored_key), _KEY):  # each pair, whichever matches
            stored_key = self._keys.stored_key[at : at + _KEY]
            signature = hmac.new(stored_key, auth_message, "sha256").digest()
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            if hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
                matched = at
        if matched < 0 or not self._known:
            return Failure("bad credentials", username=self._username)
        server_key = self._keys.server_key[matched : matched + _KEY]
        server_sig = hmac.new(server_key, auth_message, "sha256").digest()
        self._stage = 3
        return Success(self._username, f"v={base64.b64encode(server_sig).decode()}".encode())


Mechanism = Plain | Login | ScramSha256


def decoy_salt(secret: bytes, username: str) -> bytes:
    """The salt SCRAM shows for a login without an account: one per account (names that
    log in to one account get one salt, as they would for a real one), from ``secret``."""
    try:
        name = parse_user_address(username).key
    except AddressError:
        name = username.lower()
    return hmac.new(secret, name.encode(), "sha256").digest()[:16]


def new_mechanism(name: str, decoy_secret: bytes) -> Mechanism | None:
    """A fresh server-side mechanism object, or None for a name we do not offer
    (``decoy_secret``: see :class:`ScramSha256`)."""
    name = name.upper()
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "SCRAM-SHA-256":
        return ScramSha256(decoy_secret)
    return None


async def settle(
    mechanism: Mechanism,
    step: Step,
    check_password: Callable[[str, str], Awaitable[str | None]],
    scram_keys: Callable[[str], ScramKeys | None],
) -> Challenge | Success | Failure:
    """Do the server's side of ``step`` (key lookup, password check) until the exchange needs
    the client again (Challenge, or Success with a ``final`` message) or is decided.

    ``check_password`` returns the account key or None; ``scram_keys`` None for an unknown
    user. Shared by SMTP AUTH and POP3 AUTH so both speak SASL the same way.
    """
    while True:
        if isinstance(step, NeedScramKeys):
            assert isinstance(mechanism, ScramSha256)
            step = mechanism.provide_keys(scram_keys(step.username))
        elif isinstance(step, CheckPassword):
            key = await check_password(step.username, step.password)
            step = Success(key) if key else Failure("bad credentials", username=step.username)
        else:
            return step
