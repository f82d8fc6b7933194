"""DKIM verification (RFC 6376 §6, RFC 8463) of every signature of a message, with dkimpy.

dkimpy asks DNS through a ``dnsfunc`` callback, synchronously. Its own async path makes a
resolver per lookup, so instead the key records of every signature are fetched first, all at
once, through the shared :class:`~postroom.auth.lookup.DnsCache`, and dkimpy is then handed a
``dnsfunc`` that answers from those results. Results follow RFC 8601 §2.7.1: ``pass``,
``fail`` (the signature or body hash does not match), ``permerror`` (no key, a revoked or
malformed key, a malformed signature), ``temperror`` (the key lookup failed for now).

Security notes: at most ``MAX_SIGNATURES`` signatures are looked at (each costs a DNS lookup
and a public-key operation); RSA keys under 1024 bits are refused (RFC 8301 §3.2).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import dkim

from postroom.auth.lookup import Answer, DnsCache

MAX_SIGNATURES = 10
_SIG_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))")
_TAG = re.compile(rb"\s*([a-z][a-z0-9_]*)\s*=\s*([^;]*)", re.IGNORECASE)
_quiet = logging.getLogger("postroom.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str
    selector: str
    algorithm: str
    b: str  # the first characters of b= (RFC 6008 header.b), to tell signatures apart
    reason: str = ""


def tags(value: bytes) -> dict[bytes, bytes]:
    """The tag=value list of a signature (RFC 6376 §3.2), white space removed."""
    out: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        m = _TAG.match(part)
        if m:
            out.setdefault(m.group(1).lower(), re.sub(rb"\s+", b"", m.group(2)))
    return out


def signatures(head: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature in the header section ``head``, in order."""
    return [tags(m.group(1)) for m in _SIG_FIELD.finditer(head)][:MAX_SIGNATURES]


def _key_name(sig: dict[bytes, bytes]) -> str | None:
    try:
        selector = sig[b"s"].decode("ascii")
        domain = sig[b"d"].decode("ascii")
    except (KeyError, UnicodeDecodeError):
        return None
    if not selector or not domain:
        return None
    return f"{selector}._domainkey.{domain}".lower()


async def prefetch(cache: DnsCache, head: bytes) -> dict[str, Answer]:
    """The key records every signature in ``head`` needs, fetched concurrently."""
    names = list(dict.fromkeys(n for s in signatures(head) if (n := _key_name(s))))
    answers = await asyncio.gather(*(cache.query(n, "TXT") for n in names))
    return dict(zip(names, answers, strict=True))


def verify(message: bytes, keys: dict[str, Answer]) -> list[DkimResult]:
    """Verify each signature of ``message`` against the prefetched ``keys`` (CPU only)."""
    try:
        d = dkim.DKIM(message, logger=_quiet, minkey=1024)
    except dkim.MessageFormatError as exc:
        return [DkimResult("permerror", "", "", "", "", f"unparsable message: {exc}")]
    sig_headers = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(sig_headers[:MAX_SIGNATURES]):
        sig = tags(value)
        name = _key_name(sig)
        base = {
            "domain": sig.get(b"d", b"").decode("ascii", "replace").lower(),
            "selector": sig.get(b"s", b"").decode("ascii", "replace"),
            "algorithm": sig.get(b"a", b"").decode("ascii", "replace").lower(),
            "b": sig.get(b"b", b"")[:8].decode("ascii", "replace"),
        }
        answer = keys.get(name or "")
        if name is None:
            results.append(DkimResult("permerror", reason="no d= or s=", **base))
            continue
        if answer is None or answer.temporary:
            why = answer.error if answer else "key not fetched"
            results.append(DkimResult("temperror", reason=why, **base))
            continue
        records = answer.txt()
        if not records:
            results.append(DkimResult("permerror", reason="no key record", **base))
            continue

        def dnsfunc(_name: bytes, timeout: int = 5, _rec: bytes = records[0]) -> bytes:
            return _rec

        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException as exc:
            results.append(DkimResult("permerror", reason=str(exc)[:200], **base))
            continue
        except Exception as exc:  # dkimpy on hostile input: never let it end the session
            results.append(DkimResult("permerror", reason=f"unverifiable: {exc!r}"[:200], **base))
            continue
        if ok:
            results.append(DkimResult("pass", **base))
        else:
            results.append(DkimResult("fail", reason="signature did not verify", **base))
    return results
