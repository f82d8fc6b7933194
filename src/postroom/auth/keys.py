"""DKIM keys per local domain: making and storing them, and their life from selector to retirement.

Every local domain has an Ed25519 key (RFC 8463) and an RSA-2048 key (RFC 6376 §3.3.3), each
under a selector postroom chooses (``ed20261101``, ``rsa20261101``; a letter is added when a
second pair is made on the same day). A key goes through three states:

- ``pending``: made, listed by ``postroom dns``, but it signs nothing until the server has
  seen its exact public key in DNS (:meth:`KeyRing.confirm`, from ``service.py``); a key
  *withdrawn* (:meth:`KeyRing.withdraw`: it signed, then DNS stopped showing it) is pending
  again, with its ``published`` time kept;
- ``active``: DNS shows it; the newest active key of each algorithm signs;
- ``retiring``: replaced by a newer key of its algorithm; it no longer signs and stays
  listed until ``retire_at`` (``[auth] dkim_retire_after`` after it stopped signing), then it
  is deleted.

``postroom dkim rotate DOMAIN`` adds a new pending pair (a withdrawn key retires then, a
never-published one is dropped); nothing else changes until DNS shows it. Storage is behind
:class:`KeyStore` so that nodes sharing a database share their keys; :class:`LocalKeyStore`
keeps ``{data_dir}/dkim/{domain}/keys.json`` and one ``{selector}.pem`` per key. Security notes:
private key files are made 0600 in 0700 directories and their contents never reach a log or an
error message; domain names are vetted (``address.normalise_domain``) before they become paths.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postroom.address import normalise_domain
from postroom.errors import KeysChanged, PostroomError
from postroom.storage.local.files import fsync_dir, replace_durably

Algorithm = Literal["ed25519", "rsa"]
State = Literal["pending", "active", "retiring"]
ALGORITHMS: tuple[Algorithm, ...] = ("ed25519", "rsa")
RSA_BITS = 2048
_PREFIX = {"ed25519": "ed", "rsa": "rsa"}


@dataclass(frozen=True)
class DkimKey:
    """One key: its selector, algorithm, state and (PEM, PKCS#8) private key."""

    selector: str
    algorithm: Algorithm
    created: float
    state: State = "pending"
    published: float | None = None  # when the server saw it appear in DNS (kept if withdrawn)
    retire_at: float | None = None  # retiring keys: listed until then
    private_pem: bytes = b""

    def __repr__(self) -> str:  # never show the private key
        return f"DkimKey({self.selector!r}, {self.algorithm}, {self.state})"

    @property
    def withdrawn(self) -> bool:
        """It signed, then DNS stopped showing it: it waits to be seen again."""
        return self.state == "pending" and self.published is not None

    def private_key(self) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
        return private_key_of(self.private_pem)

    def public_b64(self) -> str:
        """The ``p=`` value: the raw 32 octets for Ed25519 (RFC 8463 §4.2), the DER
        SubjectPublicKeyInfo for RSA (RFC 6376 §3.6.1)."""
        return _public_b64(self.private_pem)

    def record(self) -> str:
        """The TXT value at ``SELECTOR._domainkey.DOMAIN`` (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64()}"

    def metadata(self) -> dict[str, object]:
        data = asdict(self)
        del data["private_pem"]
        return data


def generate(algorithm: Algorithm, selector: str, now: float) -> DkimKey:
    """A fresh key (RSA with 2048 bits and e = 65537)."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return DkimKey(selector, algorithm, now, private_pem=pem)


class KeysUnreadable(PostroomError):
    """A domain's ``keys.json`` or a key file that is there but cannot be read as keys
    (damaged, edited by hand, no permission): named in the message, never replaced."""


class TooManyKeys(PostroomError, ValueError):
    """A 26th key of one algorithm in one day: its selector would not be unique."""


def new_selector(algorithm: Algorithm, now: float, taken: Iterable[str]) -> str:
    """``ed20261101``, then ``ed20261101b``, ``...c`` for more on the same day: always past
    the last one of the day in ``taken``, so a name never goes to a second key even when the
    first was dropped (its record may be published, or cached by resolvers for its TTL)."""
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%d")
    base = f"{_PREFIX[algorithm]}{day}"
    suffixes = [t[len(base) :] for t in taken if t.startswith(base)]
    if not suffixes:
        return base
    last = max(suffixes)  # "" (the day's first) < "b" < "c" ...
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if letter > last:
            return base + letter
    raise TooManyKeys("too many DKIM keys made today (25 a day): rotate again tomorrow")


class KeyStore(Protocol):
    """Where DKIM keys live (the local files, or a database shared by nodes)."""

    def load(self, domain: str) -> list[DkimKey]: ...

    def save(self, domain: str, keys: list[DkimKey]) -> None:
        """Replace the domain's keys (states) at once; new keys' private parts stored."""
        ...

    def version(self, domain: str) -> object:
        """Changes whenever :meth:`save` ran (from any process), so a reader can reload."""
        ...


class LocalKeyStore:
    """``{data_dir}/dkim/{domain}/``: ``keys.json`` (states) and ``{selector}.pem`` (0600).

    Several processes may change a domain's keys at once (the server confirming a key,
    ``postroom dns`` making the first pair, ``dkim rotate``): a save takes ``.lock`` and is
    refused (:class:`KeysChanged`) when ``keys.json`` is no longer what this store last
    loaded, as the PostgreSQL store refuses; without it, the second of two first pairs
    replaced the first, whose records ``postroom dns`` had printed."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "dkim"
        self._versions: dict[str, str] = {}  # domain -> its keys.json, for version() per message
        self._seen: dict[str, bytes] = {}  # domain -> keys.json as last loaded (b"": none)

    def _dir(self, domain: str) -> Path:
        return self.root / normalise_domain(domain)

    def load(self, domain: str) -> list[DkimKey]:
        for _ in range(4):
            try:
                return self._load(domain)
            except FileNotFoundError:  # a key file a save removed after we read keys.json
                continue
        try:
            return self._load(domain)
        except FileNotFoundError as exc:  # not a save's doing: a key file is missing
            raise KeysUnreadable(f"{exc.filename}: missing") from None

    def _load(self, domain: str) -> list[DkimKey]:
        folder = self._dir(domain)
        path = folder / "keys.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self._seen[domain] = b""
            return []
        except OSError as exc:
            raise KeysUnreadable(f"{path}: {exc.strerror}") from None
        self._seen[domain] = raw
        keys = []
        try:
            for entry in json.loads(raw):
                selector = str(entry["selector"])
                _check_selector(selector)
                pem_path = folder / f"{selector}.pem"
                pem = pem_path.read_bytes()
                key = DkimKey(**entry, private_pem=pem)
                _check_fields(key)
                private_key_of(pem)  # (parsed once per process: a damaged file said here)
                keys.append(key)
        except FileNotFoundError:
            raise  # a key file a save removed after keys.json was read: load() reads again
        except OSError as exc:
            raise KeysUnreadable(f"{pem_path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:  # json's errors are ValueErrors
            raise KeysUnreadable(f"{path}: damaged: {exc!r}"[:300]) from None
        return keys

    def save(self, domain: str, keys: list[DkimKey]) -> None:
        folder = self._dir(domain)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.mkdir(exist_ok=True, mode=0o700)
        lock = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process's save finishes first
            try:
                current = (folder / "keys.json").read_bytes()
            except FileNotFoundError:
                current = b""
            seen = self._seen.get(domain)
            if seen is not None and current != seen:
                raise KeysChanged(
                    f"the DKIM keys of {domain} changed meanwhile; run the command again"
                )
            wanted = set()
            for key in keys:
                _check_selector(key.selector)
                wanted.add(f"{key.selector}.pem")
                path = folder / f"{key.selector}.pem"
                if not path.exists():
                    _write_private(path, key.private_pem)
            data = json.dumps([k.metadata() for k in keys], indent=1).encode()
            _write_private(folder / "keys.json", data)
            self._seen[domain] = data
            for name in os.listdir(folder):
                # A retired key is gone for good; a temporary file is one a killed save left
                # (under the lock no other save is writing one).
                if (name.endswith(".pem") and name not in wanted) or name.endswith(".tmp"):
                    os.unlink(folder / name)
            fsync_dir(folder)
        finally:
            os.close(lock)  # and the lock with it

    def version(self, domain: str) -> object:
        path = self._versions.get(domain)
        if path is None:  # a str made once: building the Path cost more than the stat
            path = self._versions[domain] = str(self._dir(domain) / "keys.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)


@lru_cache(maxsize=256)
def private_key_of(pem: bytes) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    """The key in ``pem``, parsed once per process (here and in the DKIM helper): loading an
    RSA-2048 key checks it, about 50 ms of CPU, and a key waiting for DNS is looked at every
    few seconds on the event loop. The key objects are immutable; a few keys per domain."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ValueError("not an Ed25519 or RSA private key")
    return key


@lru_cache(maxsize=256)
def _public_b64(pem: bytes) -> str:
    pub = private_key_of(pem).public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def _check_fields(key: DkimKey) -> None:
    """ValueError unless ``key``'s fields (from keys.json) are of their types: one edited by
    hand ("retire_at": "soon") failed every upkeep round and every `postroom dns`, and a
    key of an unknown state or algorithm stopped signing in silence."""
    if key.algorithm not in ALGORITHMS or key.state not in ("pending", "active", "retiring"):
        raise ValueError(f"{key.selector}: unknown algorithm or state")
    for name in ("created", "published", "retire_at"):
        value = getattr(key, name)
        if not (value is None and name != "created") and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ValueError(f"{key.selector}: {name} is not a time")


def _check_selector(selector: str) -> None:
    if not (selector.isascii() and selector.isalnum()):
        raise ValueError(f"bad DKIM selector {selector!r}")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, 0600 from the first octet, fsync'ed."""
    replace_durably(path, data, path.with_name(f".{path.name}.tmp"))


class KeyRing:
    """The rules of the key life cycle, over a :class:`KeyStore`. ``now`` is passed in."""

    def __init__(self, store: KeyStore, retire_after: float) -> None:
        self.store = store
        self.retire_after = retire_after

    def ensure(self, domain: str, now: float) -> list[DkimKey]:
        """The domain's keys, making a first pair if it has none that signs or will."""
        keys = self.store.load(domain)
        if not any(k.state != "retiring" for k in keys):
            try:
                keys = self._add_pair(domain, keys, now)
            except KeysChanged:
                # Another node made a pair meanwhile (nodes, or `postroom dns`, starting
                # together): theirs serve as well, and a second pair would be one too many.
                keys = self.store.load(domain)
                if not any(k.state != "retiring" for k in keys):
                    raise
        return keys

    def rotate(self, domain: str, now: float) -> list[DkimKey]:
        """A new pending pair; the current keys sign on until DNS shows the new ones. A pair
        DNS never showed is dropped; a withdrawn key retires (mail it signed may be under way)."""
        loaded = self.store.load(domain)
        keys = [self._retired(k, now) if k.withdrawn else k for k in loaded]
        keys = [k for k in keys if k.state != "pending"]
        return self._add_pair(domain, keys, now, [k.selector for k in loaded])

    def _retired(self, key: DkimKey, now: float) -> DkimKey:
        return replace(key, state="retiring", retire_at=now + self.retire_after)

    def _add_pair(
        self, domain: str, keys: list[DkimKey], now: float, taken: list[str] | None = None
    ) -> list[DkimKey]:
        """``keys`` and a new pending pair, saved; selectors past those in ``taken`` (the
        selectors of ``keys`` unless given: those of pending keys dropped count too)."""
        taken = [k.selector for k in keys] if taken is None else list(taken)
        for algorithm in ALGORITHMS:
            selector = new_selector(algorithm, now, taken)
            taken.append(selector)
            keys.append(generate(algorithm, selector, now))
        self.store.save(domain, keys)
        return keys

    def confirm(self, domain: str, selector: str, now: float) -> list[DkimKey]:
        """DNS shows ``selector``: it signs from now on, and older keys of its algorithm retire
        (listed until ``retire_after`` from now: the active one signed for the last time now, a
        withdrawn one earlier)."""
        keys = self.store.load(domain)
        new = next((k for k in keys if k.selector == selector), None)
        if new is None or new.state != "pending":
            return keys
        out = []
        for key in keys:
            if key.selector == selector:
                key = replace(key, state="active", published=now)
            elif key.algorithm == new.algorithm and (key.state == "active" or key.withdrawn):
                key = self._retired(key, now)
            elif (
                key.algorithm == new.algorithm
                and key.state == "pending"
                and key.created < new.created
            ):
                continue  # an older key that DNS never showed is of no use now
            out.append(key)
        self.store.save(domain, out)
        return out

    def withdraw(self, domain: str, selector: str) -> list[DkimKey]:
        """DNS no longer shows ``selector``, a signing key: it waits as a pending key does
        (and signs again when :meth:`confirm` sees it)."""
        return self._change(domain, selector, state="pending")

    def revoke(self, domain: str, selector: str, now: float) -> list[DkimKey]:
        """DNS shows ``selector`` revoked: it never signs again and is no longer listed (its
        files go at the next :meth:`expire`)."""
        return self._change(domain, selector, state="retiring", retire_at=now)

    def _change(self, domain: str, selector: str, **fields: Any) -> list[DkimKey]:
        """The signing key ``selector`` with ``fields`` changed, saved (nothing if it is not
        signing: another process moved it meanwhile)."""
        keys = self.store.load(domain)
        out = [
            replace(k, **fields) if k.selector == selector and k.state == "active" else k
            for k in keys
        ]
        if out != keys:
            self.store.save(domain, out)
        return out

    def expire(self, domain: str, now: float) -> list[DkimKey]:
        """Forget retiring keys whose time is up."""
        keys = self.store.load(domain)
        kept = [k for k in keys if not (k.state == "retiring" and (k.retire_at or 0) <= now)]
        if len(kept) != len(keys):
            self.store.save(domain, kept)
        return kept


def signing_keys(keys: Iterable[DkimKey]) -> list[DkimKey]:
    """The newest active key of each algorithm: those that sign."""
    best: dict[str, DkimKey] = {}
    for key in keys:
        if key.state == "active" and (
            key.algorithm not in best or key.created > best[key.algorithm].created
        ):
            best[key.algorithm] = key
    return [best[a] for a in ALGORITHMS if a in best]


def listed_keys(keys: Iterable[DkimKey], now: float) -> list[DkimKey]:
    """The keys ``postroom dns`` lists: those that sign, will sign, or signed lately."""
    return [k for k in keys if k.state != "retiring" or (k.retire_at or 0) > now]
