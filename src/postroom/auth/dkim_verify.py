"""DKIM verification (RFC 6376 §6, RFC 8463) of the signatures of a message.

The key records of every signature are fetched first, concurrently, through the shared
:class:`~postroom.auth.lookup.DnsCache` (by the caller, each on its own), and then verified
without I/O (:func:`verify`): dkimpy's verifier asks DNS through a synchronous callback, and
its async path makes a resolver per lookup. The checks are dkimpy's, made here in fewer steps:
the message is parsed and canonicalized by ``dkim_canon`` (dkimpy's results, faster; a body
once per canonicalization for all signatures), the tags read and validated as dkimpy's
``parse_tag_value`` and ``validate_signature_fields`` do (bh= is checked as base64 too:
dkimpy's check looks at b= twice), the key record parsed once per distinct record
(:func:`public_key`, cached) and the signature checked by OpenSSL through ``cryptography``
(dkimpy's RSA is pure Python: its verification and its ASN.1 key parsing took about 1 ms of
each message's 1.5 ms here). With ``dkim_canon`` and the tag reading here, one RSA-2048
signature on a 1 KiB message takes about 125 µs, against 215 µs with dkimpy's parsing
(OpenSSL's part is about 35 µs of either).
Results follow RFC 8601 §2.7.1: ``pass``, ``fail`` (the signature or body hash does not
match), ``permerror`` (no key, a revoked or malformed key, a malformed signature),
``temperror`` (the key lookup failed for now).

Which signatures are checked (RFC 6376 §6.1 lets a verifier limit their number): of the first
``MAX_SIGNATURE_FIELDS`` DKIM-Signature fields (the tags of those below are never read), at
most ``MAX_SIGNATURES`` (:func:`choose`): first those whose d= is aligned with a From domain
(relaxed, RFC 7489 §3.1.1: the same organizational domain), which DMARC needs, then the others,
each group in header order; their results come in header order (that of the fields, as a reader
finds them). Taken in header order alone, ten signatures of other domains (forwarders', or junk
added on the way) kept the author's signature from being checked, and its mail failed DMARC.
Signatures that claim an aligned d= still compete among themselves: more than ten of them leave
the lower ones unchecked.

Security notes: at most ``MAX_SIGNATURES`` signatures are checked (each costs a DNS lookup and
a public-key operation); the message's header fields are indexed and its body canonicalized
once for all of them (``dkim_canon.HeaderIndex``, ``_Bodies``), after which each costs its h=
list and a hash per l=, and choosing them costs time linear in the header section;
RSA keys under 1024 bits are refused and ``rsa-sha1`` is never a pass (RFC 8301 §3.1, §3.2); a
key record whose ``h=`` leaves out sha256 or whose ``s=`` is not for email does not verify
anything, nor one with ``t=s`` a signature whose ``i=`` is in a subdomain (RFC 6376 §3.6.1); a
signature that does not sign From is a permerror (§6.1.1: it could otherwise vouch for any
From, and DMARC would pass on it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

import dkim
import idna
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from postroom.address import display_form
from postroom.auth import dkim_canon
from postroom.auth.dkim_canon import Field
from postroom.auth.lookup import Answer, DnsCache

MAX_SIGNATURES = 10  # signatures checked (each costs a DNS lookup and a public-key operation)
MAX_KEY_RECORDS = 3  # key records tried for one signature (each a public-key operation)
_RANK = {"pass": 0, "fail": 1}  # of one signature's verdicts by several key records, the first
MAX_SIGNATURE_FIELDS = 50  # DKIM-Signature fields read to choose them from (top down)
MIN_RSA_BITS = 1024  # RFC 8301 §3.2
CLOCK_SLOP = 36000  # seconds a signer's clock may be off (t= ahead, x= behind), as dkimpy
_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1")  # rsa-sha1: known, never a pass
_WSP = re.compile(rb"\s+")
_BASE64 = re.compile(rb"[0-9A-Za-z+/]+=*")  # after white space is removed
_NOT_IN_DOMAIN = re.compile(rb"[()<>\[\]:;@\\,]")
_LENGTH = re.compile(rb"\d{0,76}")
_QP = re.compile(rb"=([0-9A-Fa-f]{2})")
_SIG_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))")

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
# b= kept for header.b: all of a real one (RSA-8192's is 1,366 characters), bounded whatever a
# message holds (the start that tells two apart is looked for in it: see results.py).
MAX_B = 1400


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str
    selector: str
    algorithm: str
    b: str  # b= (its start is RFC 6008's header.b, to tell signatures apart)
    reason: str = ""
    identity: str = ""  # i=, the AUID (RFC 6376 §3.5), decoded; "" when the signature has none


def tags(value: bytes) -> dict[bytes, bytes]:
    """The tag=value list of a signature or key record (RFC 6376 §3.2), white space removed;
    what is not a tag is skipped (a signature's tags are checked by :func:`parse_tags`)."""
    out: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, eq, tag_value = part.partition(b"=")
        name = name.strip()  # tag names are case-sensitive (RFC 6376 §3.2)
        if eq and name:
            out.setdefault(name, b"".join(tag_value.split()))
    return out


def signatures(head: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature in the header section ``head``, in order: of the first
    ``MAX_SIGNATURE_FIELDS`` (the positions :func:`choose` and :func:`verify` count in)."""
    found = islice(_SIG_FIELD.finditer(head), MAX_SIGNATURE_FIELDS)
    return [tags(m.group(1)) for m in found]


def choose(sigs: Sequence[dict[bytes, bytes]], aligned: Callable[[str], bool]) -> list[int]:
    """The positions in ``sigs`` (:func:`signatures`) of those to check, in header order: at
    most ``MAX_SIGNATURES``, those whose d= is ``aligned`` (with a From domain) first, then
    the others (see the module's docstring)."""
    first = [i for i, sig in enumerate(sigs) if (d := names_of(sig)["domain"]) and aligned(d)]
    taken = set(first)
    rest = [i for i in range(len(sigs)) if i not in taken]
    return sorted((first + rest)[:MAX_SIGNATURES])


def _key_name(sig: dict[bytes, bytes]) -> str | None:
    """Where the key of ``sig`` is published; None without a usable d= and s=."""
    selector, domain = _a_label(sig.get(b"s", b"")), _a_label(sig.get(b"d", b""))
    if not selector or not domain:
        return None
    return f"{selector}._domainkey.{domain}".lower()


def _identity_domain(sig: dict[bytes, bytes]) -> str:
    """The domain of i= (dkim-quoted-printable, RFC 6376 §2.11) as A-labels, lower-cased, to
    compare with d=: either may be written in U-labels (RFC 8616 §4); "" if it is none."""
    identity = _QP.sub(lambda m: bytes([int(m.group(1), 16)]), sig.get(b"i", b""))
    _local, at, domain = identity.rpartition(b"@")  # sig-i-tag: [ Local-part ] "@" domain-name
    return _a_label(domain).lower() if at else ""


def _a_label(value: bytes) -> str:
    """A d= or s= value as the DNS has it: in an internationalized message it may be written
    in U-labels (RFC 8616 §4), and the key is published at the A-label name. "" when it is
    no name (not UTF-8, not IDNA)."""
    if value.isascii():
        return value.decode("ascii")
    try:
        text = value.decode("utf-8")
        return "" if display_form(text) else idna.encode(text, uts46=True).decode("ascii")
    except (UnicodeError, idna.IDNAError):
        return ""


def key_names(sigs: list[dict[bytes, bytes]]) -> list[str]:
    """The key records the signatures ``sigs`` (see :func:`signatures`) need."""
    return list(dict.fromkeys(n for s in sigs if (n := _key_name(s))))


def cached_keys(cache: DnsCache, names: list[str]) -> dict[str, Answer] | None:
    """The key records from the cache alone; None when one must be asked."""
    out = {}
    for name in names:
        answer = cache.peek(name, "TXT")
        if answer is None:
            return None
        out[name] = answer
    return out


@dataclass(frozen=True)
class PublicKey:
    """A DKIM key record, parsed: the signature algorithm it verifies and the key."""

    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    same_domain: bool = False  # t=s: the i= domain must be d= itself, no subdomain

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the header data.
                self.key.verify(signature, hashlib.sha256(data).digest())
            else:
                self.key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True


@lru_cache(maxsize=1024)
def public_key(record: bytes) -> PublicKey:
    """The key of a ``SELECTOR._domainkey`` TXT record (RFC 6376 §3.6.1, RFC 8463 §4.2);
    ``dkim.KeyFormatError`` when it cannot verify email signatures. Cached per record."""
    try:
        tags_ = parse_tags(record)
    except dkim.MessageFormatError as exc:
        raise dkim.KeyFormatError(f"malformed key record: {exc}") from None
    if tags_.get(b"v", b"DKIM1") != b"DKIM1":
        raise dkim.KeyFormatError("key record version is not DKIM1")
    # RFC 6376 §3.6.1 s=: a colon-separated list of service types; unknown ones are ignored.
    services = [service.strip() for service in tags_.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        raise dkim.KeyFormatError("key is not for email (s=)")
    if b"h" in tags_ and b"sha256" not in [h.strip() for h in tags_[b"h"].split(b":")]:
        raise dkim.KeyFormatError("key does not allow sha256 (h=)")
    try:
        raw = base64.b64decode(_WSP.sub(b"", tags_[b"p"]), validate=True)
    except KeyError:
        raise dkim.KeyFormatError("key record has no p=") from None
    except ValueError:
        raise dkim.KeyFormatError("p= is not base64") from None
    if not raw:
        raise dkim.KeyFormatError("key revoked (empty p=)")
    kind = tags_.get(b"k", b"rsa")
    same_domain = b"s" in [flag.strip() for flag in tags_.get(b"t", b"").split(b":")]
    try:
        if kind == b"ed25519":
            ed = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            return PublicKey(b"ed25519-sha256", ed, same_domain)
        if kind == b"rsa":
            key = serialization.load_der_public_key(raw)
            if not isinstance(key, rsa.RSAPublicKey):
                raise dkim.KeyFormatError("k=rsa but p= is not an RSA key")
            if key.key_size < MIN_RSA_BITS:
                raise dkim.KeyFormatError(f"public key too small: {key.key_size} bits")
            return PublicKey(b"rsa-sha256", key, same_domain)
    except ValueError as exc:
        raise dkim.KeyFormatError(f"could not parse the public key: {exc}") from None
    raise dkim.KeyFormatError("unknown key type (k=)")


def parse_tags(value: bytes) -> dict[bytes, bytes]:
    """A signature's tag list (RFC 6376 §3.2) as dkimpy's ``parse_tag_value`` reads it: values
    stripped at both ends (folds inside kept); ``dkim.MessageFormatError`` for a tag without
    "=", a name that does not start with a letter, or a tag given twice."""
    out: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        specs.pop()  # a trailing ";" is allowed
    for spec in specs:
        name, eq, tag_value = spec.partition(b"=")
        name = name.strip()
        if not eq or not name[:1].isalpha():
            raise dkim.MessageFormatError(f"malformed tag: {spec[:40]!r}")
        if name in out:
            raise dkim.MessageFormatError(f"tag {name.decode('ascii', 'replace')}= given twice")
        out[name] = tag_value.strip()
    return out


def _validate(sig: dict[bytes, bytes], now: int) -> None:
    """The checks of dkimpy's ``validate_signature_fields`` (RFC 6376 §3.5, §6.1.1);
    ``dkim.ValidationError`` for the first that fails. Three differ: bh= must be base64 too,
    a ``cv=`` tag is ignored like any tag DKIM does not define (RFC 6376 §3.2; dkimpy refuses
    one that is not an ARC value), and q= may list other query methods beside dns/txt
    (dkimpy wants dns/txt alone)."""
    for name in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):
        if name not in sig:
            raise dkim.ValidationError(f"missing {name.decode()}=")
    if b"from" not in [name.strip().lower() for name in sig[b"h"].split(b":")]:
        raise dkim.ValidationError("From field not signed")  # RFC 6376 §6.1.1: PERMFAIL
    if sig[b"v"] != b"1":
        raise dkim.ValidationError("v= value is not 1")
    if sig[b"a"] not in _ALGORITHMS:
        raise dkim.ValidationError(
            f"unknown signature algorithm: {sig[b'a'][:40].decode('ascii', 'backslashreplace')}"
        )
    for name in (b"b", b"bh"):
        value = _WSP.sub(b"", sig[name])  # a pattern with white space in it backtracks
        if not _BASE64.fullmatch(value) or len(value) % 4:
            raise dkim.ValidationError(f"{name.decode()}= value is not valid base64")
    domain = sig[b"d"]
    if domain.isascii() and _NOT_IN_DOMAIN.search(domain):
        raise dkim.ValidationError("d= value is not valid")
    if b"i" in sig:
        home, of_identity = _a_label(domain).lower(), _identity_domain(sig)
        if not (home and of_identity) or not (
            of_identity == home or of_identity.endswith("." + home)
        ):
            raise dkim.ValidationError("i= domain is not a subdomain of d=")
    if b"l" in sig and not _LENGTH.fullmatch(sig[b"l"]):
        raise dkim.ValidationError("l= value is not a decimal integer")
    # RFC 6376 §3.5 q=: a colon-separated list; unrecognized methods are ignored.
    if b"q" in sig and b"dns/txt" not in [q.strip().lower() for q in sig[b"q"].split(b":")]:
        raise dkim.ValidationError("q= lists no dns/txt")
    signed = None
    if b"t" in sig:
        if not sig[b"t"].isdigit():
            raise dkim.ValidationError("t= value is not a decimal integer")
        signed = int(sig[b"t"])
        if signed > now + CLOCK_SLOP:
            raise dkim.ValidationError("t= value is in the future")
    if b"x" in sig:
        if not sig[b"x"].isdigit():
            raise dkim.ValidationError("x= value is not a decimal integer")
        expires = int(sig[b"x"])
        if expires < now - CLOCK_SLOP:
            raise dkim.ValidationError("x= value is past")  # RFC 6376 §3.5 x=
        if signed is not None and expires <= signed:  # §3.5 x=: MUST be greater than t=
            raise dkim.ValidationError("x= value is not greater than t= value")


class _Bodies:
    """A message's body, canonicalized once per algorithm and hashed once per algorithm and
    l= for all its signatures: ten signatures with ten l= values canonicalized a 20 MB body
    ten times (2.75 s, against 0.59 s for one)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._canonical: dict[bytes, bytes] = {}
        self.hashes: dict[tuple[bytes, bytes | None], bytes] = {}  # b"": l= beyond the body

    def canonical(self, algorithm: bytes) -> bytes:
        canonical = self._canonical.get(algorithm)
        if canonical is None:
            canonical = self._canonical[algorithm] = dkim_canon.canonical_body(algorithm, self.body)
        return canonical


def _check(
    index: dkim_canon.HeaderIndex,
    bodies: _Bodies,
    field: Field,
    key_name: str,
    record: bytes,
    now: int,
) -> bool:
    """One signature (the DKIM-Signature ``field`` of a message whose header fields are in
    ``index`` and body in ``bodies``) against its key ``record``; dkimpy's exceptions for
    what is malformed. ``index`` and ``bodies`` keep what the next signature can reuse."""
    sig = parse_tags(field[1])
    _validate(sig, now)
    if _key_name(sig) != key_name:  # read otherwise by tags(), which found the key
        raise dkim.ValidationError("d= or s= is malformed")
    algorithm = sig[b"a"]
    if algorithm == b"rsa-sha1":
        raise dkim.ValidationError("rsa-sha1 is not accepted (RFC 8301 section 3.1)")
    key = public_key(record)
    if key.algorithm != algorithm:
        raise dkim.KeyFormatError(
            f"a={algorithm.decode()} with a key for {key.algorithm.decode('ascii', 'replace')}"
        )
    # RFC 6376 §3.6.1 t=s: the i= domain must not be a subdomain of d=.
    if key.same_domain and b"i" in sig and _identity_domain(sig) != _a_label(sig[b"d"]).lower():
        raise dkim.KeyFormatError("the key's t=s refuses an i= in a subdomain of d=")
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        raise dkim.MessageFormatError(f"invalid c= value: {exc}") from None
    algorithm_name: bytes = policy.body_algorithm.name
    which = (algorithm_name, sig.get(b"l"))
    body_hash = bodies.hashes.get(which)
    if body_hash is None:
        canonical_body = bodies.canonical(algorithm_name)
        if b"l" in sig and int(sig[b"l"]) > len(canonical_body):
            body_hash = bodies.hashes[which] = b""  # (known for the next signature or key)
        else:
            length = int(sig[b"l"]) if b"l" in sig else len(canonical_body)
            with memoryview(canonical_body) as view:
                body_hash = bodies.hashes[which] = hashlib.sha256(view[:length]).digest()
    if not body_hash:  # §3.5 l=: MUST NOT be larger than the body (OpenDKIM refuses it too)
        raise dkim.ValidationError("l= value is larger than the body")
    if body_hash != base64.b64decode(_WSP.sub(b"", sig[b"bh"])):
        return False  # body hash mismatch
    include = [name.strip().lower() for name in sig[b"h"].split(b":")]
    if b"from" in include:
        include.append(b"from")  # as dkimpy: a From field added on top breaks it
    header = dkim_canon.header_policy(policy)
    data = dkim_canon.signature_data(header, index.select(header, include), field)
    return key.verify(base64.b64decode(_WSP.sub(b"", sig[b"b"])), data)


def names_of(sig: dict[bytes, bytes]) -> dict[str, str]:
    """What a result says of its signature: d=, s=, a=, the start of b= (RFC 6008) and i=."""
    # i= is dkim-quoted-printable (RFC 6376 §2.11, §3.5): "=XX" is an octet.
    identity = _QP.sub(lambda m: bytes([int(m.group(1), 16)]), sig.get(b"i", b""))
    return {
        "domain": _a_label(sig.get(b"d", b"")).lower(),
        "selector": _a_label(sig.get(b"s", b"")),
        "algorithm": _ascii(sig.get(b"a", b"")).lower(),
        "b": _NOT_BASE64.sub(b"", sig.get(b"b", b"")[: MAX_B * 2])[:MAX_B].decode("ascii"),
        "identity": identity.decode("utf-8", "replace"),
    }


def _ascii(value: bytes) -> str:
    """A tag's value for the results header, "" (left out) when it is not ASCII: such a d= or
    s= names no key, and its octets, decoded one by one, put U+FFFD into our own header."""
    return value.decode("ascii") if value.isascii() else ""


def verify(
    message: bytes, keys: dict[str, Answer], chosen: Sequence[int] | None = None
) -> list[DkimResult]:
    """Verify the signatures of ``message`` at the positions ``chosen`` (:func:`choose`;
    None: the first ``MAX_SIGNATURES``) against the prefetched ``keys`` (CPU only)."""
    try:
        fields, body = dkim_canon.split_message(message)
    except dkim_canon.MalformedHeader as exc:
        return [DkimResult("permerror", "", "", "", "", f"unparsable message: {exc}")]
    sig_fields = [f for f in fields if f[0].lower().rstrip() == b"dkim-signature"]
    positions = range(MAX_SIGNATURES) if chosen is None else sorted(set(chosen))
    picked = [sig_fields[i] for i in positions[:MAX_SIGNATURES] if 0 <= i < len(sig_fields)]
    index, bodies = dkim_canon.HeaderIndex(fields), _Bodies(body)
    now = int(time.time())
    results = []
    for field in picked:
        sig = tags(field[1])
        name = _key_name(sig)
        base = names_of(sig)
        answer = keys.get(name or "")
        if name is None:
            given = b"d" in sig and b"s" in sig
            why = "d= or s= is not a domain name" if given else "no d= or s="
            results.append(DkimResult("permerror", reason=why, **base))
            continue
        if answer is None or answer.temporary:
            why = answer.error if answer else "key not fetched"
            results.append(DkimResult("temperror", reason=why, **base))
            continue
        # RFC 6376 §3.6.1 v=: a record that starts with another version is discarded (an SPF
        # record beside the key, say); of several keys, §6.1.2 lets us try each.
        records = [r for r in answer.txt() if not _other_version(r)][:MAX_KEY_RECORDS]
        if not records:
            results.append(DkimResult("permerror", reason="no key record", **base))
            continue
        verdicts = []
        for record in records:
            check = functools.partial(_check, index, bodies, field, name, record, now)
            verdicts.append(_verdict(check))
            if verdicts[-1][0] == "pass":
                break
        # None passed: a key that read but did not verify (fail) says more than an unusable
        # one (permerror), whatever the order DNS gave them in.
        result, reason = min(verdicts, key=lambda verdict: _RANK.get(verdict[0], 2))
        results.append(DkimResult(result, reason=reason, **base))
    return results


def _other_version(record: bytes) -> bool:
    """Does a TXT record at a key's name start with a ``v=`` other than ``DKIM1``?"""
    name, sep, value = record.split(b";", 1)[0].partition(b"=")
    return bool(sep) and name.strip() == b"v" and value.strip() != b"DKIM1"


def _verdict(check: Callable[[], bool]) -> tuple[str, str]:
    """One signature against one key record (``check``, a bound :func:`_check`): its result
    (pass, fail, permerror) and why."""
    try:
        ok = check()
    except dkim.DKIMException as exc:
        return "permerror", str(exc)[:200]
    except Exception as exc:  # dkimpy on hostile input: never let it end the session
        return "permerror", f"unverifiable: {exc!r}"[:200]
    return ("pass", "") if ok else ("fail", "signature did not verify")
