"""The DNS records a local domain publishes, as ``postroom dns`` prints them, and their check.

For a local domain: the MX (pointing at ``hostname``, in A-labels as config.py keeps it, RFC
5321 §5.1), an SPF TXT (``v=spf1 mx -all``: the MX hosts send, nothing else does, RFC 7208),
one DKIM TXT per listed
selector at ``SELECTOR._domainkey.DOMAIN`` (RFC 6376 §3.6.2.1), and a DMARC TXT at
``_dmarc.DOMAIN`` with ``[auth] dmarc_policy`` and a ``rua=`` address at the domain (RFC 7489
§6.3). :func:`master_line` writes RFC 1035 §5.1 master-file lines with absolute names, TTL and
class ``IN``, TXT values as quoted strings of at most 255 octets (RFC 1035 §3.3.14);
:func:`check` compares each record with what DNS answers, record by record. Pure except
:func:`check`, which asks the shared DNS cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import dkim

from postroom.auth.dkim_verify import public_key, tags
from postroom.auth.dmarc import DmarcRecord, is_record, parse_record
from postroom.auth.keys import DkimKey
from postroom.auth.lookup import DnsCache

TTL = 3600
MX_PREFERENCE = 10


@dataclass(frozen=True)
class DnsRecord:
    name: str  # absolute, with the final dot
    type: str
    ttl: int
    value: str  # MX: "10 host."; TXT: the text, unquoted and unsplit

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def dmarc_value(policy: str, rua: Sequence[str]) -> str:
    return f"v=DMARC1; p={policy}; rua={','.join(rua)}"


def wanted(
    domain: str, hostname: str, keys: list[DkimKey], policy: str, rua: Sequence[str]
) -> list[DnsRecord]:
    """The records to publish for ``domain`` (``keys``: the listed ones; ``rua``: the
    report URIs, ``mailto:...``)."""
    origin = f"{domain}."
    out = [
        DnsRecord(origin, "MX", TTL, f"{MX_PREFERENCE} {hostname.rstrip('.')}."),
        DnsRecord(origin, "TXT", TTL, "v=spf1 mx -all"),
    ]
    out += [DnsRecord(f"{k.selector}._domainkey.{origin}", "TXT", TTL, k.record()) for k in keys]
    out.append(DnsRecord(f"_dmarc.{origin}", "TXT", TTL, dmarc_value(policy, rua)))
    return out


def txt_strings(value: str) -> list[str]:
    """``value`` cut into strings of at most 255 octets (RFC 1035 §3.3.14), quoted; an octet
    that is not printable ASCII written as ``\\DDD`` (RFC 1035 §5.1), so that a cut inside a
    UTF-8 character keeps every octet."""
    raw = value.encode("utf-8")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return ['"' + "".join(map(_master_char, chunk)) + '"' for chunk in chunks]


def _master_char(octet: int) -> str:
    if octet in (0x22, 0x5C):  # " and \
        return "\\" + chr(octet)
    return chr(octet) if 0x20 <= octet < 0x7F else f"\\{octet:03d}"


def master_line(record: DnsRecord) -> str:
    """One RFC 1035 master-file line."""
    value = " ".join(txt_strings(record.value)) if record.type == "TXT" else record.value
    return f"{record.name}\t{record.ttl}\tIN\t{record.type}\t{value}"


@dataclass(frozen=True)
class Finding:
    record: DnsRecord
    status: str  # ok, missing, different, unknown (DNS failed)
    found: str = ""

    def line(self) -> str:
        where = f"{self.record.name} {self.record.type}"
        if self.status == "ok":
            return f"ok\t{where}"
        if self.status == "missing":
            return f"missing\t{where}: publish {master_line(self.record)}"
        if self.status == "unknown":
            return f"unknown\t{where}: DNS lookup failed: {self.found}"
        return f"different\t{where}: DNS has {self.found!r}, expected {self.record.value!r}"


def same_key(found: bytes, expected: bytes) -> bool:
    """Does the DKIM key record ``found`` let a verifier check what ``expected`` (the record
    postroom asks for) does: a record a verifier accepts (``v=``, ``s=``, ``h=``), of the same
    key type (``k=``) and public key (``p=``)? A key signs only once DNS shows this."""
    try:
        have, want = public_key(found), public_key(expected)
    except dkim.KeyFormatError:
        return False
    return have.algorithm == want.algorithm and tags(found).get(b"p") == tags(expected).get(b"p")


def _same(record: DnsRecord, text: str) -> bool:
    if record.name.startswith("_dmarc."):
        found = _dmarc_meaning(text)
        return found is not None and found == _dmarc_meaning(record.value)
    if "._domainkey." in record.name:
        return same_key(text.encode(), record.value.encode())
    return _spf_terms(text) == _spf_terms(record.value)


def _dmarc_meaning(text: str) -> DmarcRecord | None:
    """A DMARC record as a receiver reads it, the rua= addresses in any case (their domain
    is, and no receiver tells the case of their local part)."""
    record = parse_record(text)
    if record is None:
        return None
    return replace(record, rua=tuple(uri.lower() for uri in record.rua))


def _spf_terms(text: str) -> list[str]:
    """An SPF record's terms as evaluation reads them: names in any case, ``+`` the default
    qualifier of a mechanism (RFC 7208 §4.6.1-4.6.2). A term with a macro is taken as it is
    (``%{L}`` is not ``%{l}``, §7.3), and so is a modifier (``+redirect=`` is no modifier)."""
    terms = []
    for term in text.split():
        if "%" not in term:
            term = term.lower()
        if term.startswith("+") and "=" not in term:
            term = term[1:]
        terms.append(term)
    return terms


async def check(cache: DnsCache, records: list[DnsRecord]) -> list[Finding]:
    """Each record against what DNS answers now (fresh, not from the cache). The questions
    are asked together: with a dead server the whole check takes one ``[dns] timeout``."""
    answers = await asyncio.gather(
        *(cache.query(record.name, record.type, fresh=True) for record in records)
    )
    out = []
    for record, answer in zip(records, answers, strict=True):
        if answer.temporary:
            out.append(Finding(record, "unknown", answer.error))
            continue
        if record.type == "MX":
            host = record.value.split()[1].rstrip(".").lower()
            hosts = [h for _p, h in answer.records] if answer.status == "ok" else []
            if host in hosts:
                out.append(Finding(record, "ok"))
            else:
                out.append(Finding(record, "different" if hosts else "missing", " ".join(hosts)))
            continue
        texts = [t.decode("utf-8", "replace") for t in answer.txt()]
        if record.name.startswith("_dmarc."):
            kin = [t for t in texts if is_record(t)]
        elif "._domainkey." in record.name:
            kin = texts
        else:
            kin = [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
        if len(kin) > 1 and "._domainkey." not in record.name:
            # RFC 7208 §4.5: several SPF records are a permerror; RFC 7489 §6.6.3: several
            # DMARC records, no DMARC at all. Right or not, each one spoils the others.
            out.append(Finding(record, "different", f"{len(kin)} records: " + " | ".join(kin)))
        elif any(_same(record, t) for t in kin):
            out.append(Finding(record, "ok"))
        elif kin:
            out.append(Finding(record, "different", kin[0]))
        else:
            out.append(Finding(record, "missing"))
    return out
