"""DMARC (RFC 7489): the From: domain's policy, identifier alignment, and the verdict.

:func:`parse_record` reads a ``v=DMARC1`` TXT record (§6.3, §6.4), :func:`discover` finds the
policy at ``_dmarc.<From domain>`` or else at ``_dmarc.<organizational domain>`` (§6.6.3), the
organizational domain coming from the public suffix list (``publicsuffixlist``, §3.2), and
:func:`evaluate` decides: ``pass`` when an SPF or a DKIM pass is aligned with the From domain
(relaxed: same organizational domain; strict: the same name, §3.1), ``fail`` otherwise,
``none`` without a policy, ``temperror`` when DNS failed (for the policy, or for an aligned
SPF or DKIM result that might have passed), ``permerror`` when the message has no usable
From domain. The disposition follows ``p``/``sp`` and ``pct`` (§6.6.4: the mail left out
by ``pct`` gets the next milder policy); the random draw is passed in.

From domains are taken as A-labels (§6.6.1: ``x@bänk.test`` is ``xn--bnk-qla.test``, as SPF,
DKIM and the configuration write it). Security notes: a From field with several addresses,
or several From fields, would otherwise let a forged domain ride along with one that passes:
every From domain (up to ``MAX_FROM_DOMAINS``) is checked and the strictest verdict applies
(§6.6.1: "the most strict policy selected among the checks that fail"); an address without a
domain, or domains beyond the limit, keep the message from passing (``permerror``).
"""

from __future__ import annotations

import email.errors
import email.header
import email.policy
import email.utils
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import idna
from publicsuffixlist import PublicSuffixList

from postroom.address import display_form, normalise_domain
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.lookup import Answer, DnsCache
from postroom.auth.spf import SpfResult

_FROM = re.compile(rb"(?im)^from[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))")
# A From value that is one plain address, alone or after a plain display name: both of
# _field_domains's parsers read its domain alike.
# Possessive throughout: it must not backtrack (6 KB of spaces took a minute of the event loop).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]++"
_PLAIN_FROM = re.compile(
    rf'\s*+(?:(?:"[^"\\\r\n@]*+"|{_ATEXT}(?:[ \t]++{_ATEXT})*+)?+\s*+<{_ATEXT}@[A-Za-z0-9.-]++>'
    rf"|{_ATEXT}@[A-Za-z0-9.-]++)\s*+"
)
# Octets of one From field's value that are parsed (both parsers take quadratic time on some
# input: seconds for 64 KB, on the event loop); a longer one is refused (from_too_long). The
# reader's parser only gets values of up to _READ_AT_MOST characters (15 ms at worst).
MAX_FROM_LENGTH = 4096
_READ_AT_MOST = 1024
_SCANNED_AT_MOST = 64  # distinct "@domain"s read from a From value too long to parse
_AT_DOMAIN = re.compile(r"@[ \t]*+([^\s<>\[\]\",;:@]++)")  # what follows any "@"
# Comment parentheses, quoted-pair backslashes, and format characters (Unicode Cf: marks of
# direction, zero-width joiners, tags), which no display draws.
# (FORMAT_CHARACTERS: those of the Unicode version of Python 3.11; a test compares them.)
FORMAT_CHARACTERS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_UNSEEN = re.compile(r"[()\\" + FORMAT_CHARACTERS + "]")
POLICIES = ("none", "quarantine", "reject")
_PCT = re.compile(r"[0-9]{1,3}")
MAX_FROM_DOMAINS = 10  # distinct From domains checked (each costs up to two DNS lookups)


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the name itself if it is a suffix)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


@dataclass(frozen=True)
class DmarcRecord:
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    fo: str = "0"  # failure reporting options (§6.3), echoed in aggregate reports
    raw: str = field(default="", compare=False)  # the text as found


def is_record(text: str) -> bool:
    """Does ``text`` claim to be a DMARC record (§6.3: ``v=DMARC1`` first)? The tag name is
    an ABNF quoted string, case-insensitive (RFC 5234 §2.3); the value is exact (§6.4)."""
    name, sep, value = text.split(";", 1)[0].partition("=")
    return bool(sep) and name.strip(" \t").lower() == "v" and value.strip(" \t") == "DMARC1"


def record_tags(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record (names lower-cased, the first of a name kept), or None if
    ``text`` is not one (§6.3: ``v=DMARC1`` first)."""
    if not is_record(text):
        return None
    tags: dict[str, str] = {}
    for item in text.split(";")[1:]:
        name, sep, value = item.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record, or None if ``text`` is not one (§6.3: ``v=DMARC1`` first), or one that
    asks for no DMARC processing (a missing or wrong ``p``, or a wrong ``sp``, and no valid
    ``rua``, §6.6.3 step 6)."""
    tags = record_tags(text)
    if tags is None:
        return None
    rua = tuple(
        uri.strip()
        for uri in tags.get("rua", "").split(",")
        if uri.strip().lower().startswith("mailto:")
    )
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in POLICIES or sp not in POLICIES:
        # §6.6.3 step 6: a record whose p is missing or wrong, or whose sp is wrong, counts
        # as p=none if it has a valid rua, else as no record.
        if not rua:
            return None
        p = sp = "none"
    # §6.3 pct: an integer 0-100 (ABNF 1*3DIGIT); anything else is a syntax error, which
    # §6.3 says to discard for the default, 100 (clamped, -1 was 0: p=reject for no mail).
    raw_pct = tags.get("pct", "100")
    pct = int(raw_pct) if _PCT.fullmatch(raw_pct) and int(raw_pct) <= 100 else 100
    return DmarcRecord(
        p=p,
        sp=sp,
        pct=pct,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        rua=rua,
        fo=tags.get("fo", "0") or "0",
        raw=text,
    )


def from_domains(head: bytes) -> list[str]:
    """The domains (A-labels, lower case) of every address in every From field of the header
    section ``head``, in order ("" for an address without one)."""
    domains: list[str] = []
    for m in _FROM.finditer(head):
        domains += _field_domains(m.group(1))
    return domains


@lru_cache(maxsize=4096)
def _field_domains(raw: bytes) -> tuple[str, ...]:
    """The domain of each address of one From field's value ("" for one without), as
    ``email.utils.getaddresses`` reads them, then every other domain that a mail client's
    parser finds there (the email package's own, which readers of the delivered message use):
    the two disagree on what is no plain address, and DMARC must judge every author a reader
    may be shown. ``From: ceo@bank.test x.evil.test`` was read as ``bank.testx.evil.test``,
    whose organizational domain is the sender's own (dmarc=pass), and is shown as
    ``ceo@bank.test``; ``ceo@bank.test[`` had no domain (permerror, delivered) and is shown
    the same. Where a parser gives up (nested comments: RecursionError) or finds an address
    without a domain, and for a value too long to parse on the event loop (both parsers take
    quadratic time on some input: seconds for 64 KB), every ``@domain`` in the field counts,
    read as leniently as a reader might (:func:`_scanned`)."""
    value = raw.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    if len(raw) > MAX_FROM_LENGTH:  # (refused when DMARC is enforced: only bounded here)
        scanned = _scanned(value)[:_SCANNED_AT_MOST]
        return tuple(dict.fromkeys(filter(None, map(_shown_domain, scanned)))) or ("",)
    try:
        domains = [_author_domain(addr) for _name, addr in email.utils.getaddresses([value])]
    except RecursionError:
        domains = [""]
    if _PLAIN_FROM.fullmatch(value):
        return tuple(domains)  # (both parsers read these alike; the reader's costs 0.1 ms)
    shown = [""]
    if len(value) <= _READ_AT_MOST:
        try:
            shown = [a.domain for a in email.policy.default.header_factory("From", value).addresses]
        except Exception:  # (RecursionError, or a parser's bug: not a way through)
            shown = [""]
    if "" in domains or "" in shown:
        shown += _scanned(value)
    for name in shown:
        domain = _shown_domain(name)
        if domain and domain not in domains:
            domains.append(domain)
    return tuple(domains)


def _scanned(value: str) -> list[str]:
    """What follows each ``@`` of a From value (each once), once the parentheses of comments,
    the backslashes of quoted pairs and the characters no display draws (format characters:
    ``ceo@bank.test<LRM>``) are taken out: what a reader may show as the domain."""
    return list(dict.fromkeys(_AT_DOMAIN.findall(_UNSEEN.sub("", value))))


def from_too_long(head: bytes) -> bool:
    """Has the header section ``head`` a From field too long to be read in bounded time (no
    real sender writes one: its message may be refused, as one with too many authors)?"""
    return any(len(m.group(1)) > MAX_FROM_LENGTH for m in _FROM.finditer(head))


def _shown_domain(name: str) -> str:
    """The domain a reader may take ``name`` for (A-labels), or "": also one spelt with
    encoded-words, characters no display draws, or display forms (``bank。test``, fullwidth
    letters) that an address may not use but UTS 46 maps to one."""
    try:
        if "=?" in name:
            name = "".join(
                part.decode(charset or "ascii", "replace") if isinstance(part, bytes) else part
                for part, charset in email.header.decode_header(name)
            )
        name = _UNSEEN.sub("", name)
        if display_form(name):
            name = idna.encode(name, uts46=True).decode()
        domain = normalise_domain(name)
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return ""
    return "" if domain.startswith("[") else domain


def _author_domain(addr: str) -> str:
    """§6.6.1: the domain of ``addr`` as A-labels ("" if it has none)."""
    local, at, domain = addr.rpartition("@")
    domain = domain.strip().rstrip(".")
    if not (at and local and domain) or domain.startswith("["):
        return ""  # (an address literal is no domain: no policy can be looked up for it)
    try:
        return normalise_domain(domain)
    except ValueError:
        # Not a domain ('Bank <"victim@bank.example">' gives 'bank.example"'): none, so the
        # message cannot pass (permerror), as a From without one; looked up as written, it
        # had no policy and read as dmarc=none, its p=reject never applied.
        return ""


def too_many_authors(from_domains_: Sequence[str]) -> bool:
    """Are there more distinct From domains than are checked (the rest would ride along)?"""
    return len(set(filter(None, from_domains_))) > MAX_FROM_DOMAINS


def author_domains(from_domains_: Sequence[str]) -> list[str]:
    """The distinct From domains that are checked, in order (at most ``MAX_FROM_DOMAINS``)."""
    return list(dict.fromkeys(d for d in from_domains_ if d))[:MAX_FROM_DOMAINS]


@dataclass(frozen=True)
class Policy:
    """What DNS said: the record (or None), where it was found, or a temporary failure."""

    record: DmarcRecord | None
    domain: str = ""  # where the record was found
    temporary: str = ""


def _policy_from(answers: list[tuple[str, Answer]]) -> Policy | None:
    """§6.6.3 over the answers for ``_dmarc.<from domain>`` then ``_dmarc.<org domain>``
    (in order, as far as they go); None if the answers given do not settle it."""
    for domain, answer in answers:
        if answer.temporary:
            return Policy(None, domain, temporary=answer.error)
        texts = [t.decode("utf-8", "replace") for t in answer.txt()]
        claimed = [t for t in texts if is_record(t)]  # step 2: the others are discarded
        if not claimed:
            continue  # step 3: the organizational domain's, if any
        if len(claimed) > 1:
            return Policy(None, domain)  # step 5: several records, no DMARC processing
        # Step 6: a wrong or missing p without a valid rua is no DMARC processing, too (no
        # falling back to the organizational domain's record).
        return Policy(parse_record(claimed[0]), domain)
    return None


def _candidates(from_domain: str) -> list[str]:
    return list(dict.fromkeys((from_domain, organizational_domain(from_domain))))


def cached_policy(cache: DnsCache, from_domain: str) -> Policy | None:
    """:func:`discover` from the cache alone; None when something must be asked. The policy
    is kept as long as the answers it was read from (no record parsed per message)."""
    key = ("dmarc", from_domain)
    kept = cache.recall(key)
    if isinstance(kept, Policy):
        return kept
    answers = []
    for domain in _candidates(from_domain):
        answer = cache.peek(f"_dmarc.{domain}", "TXT")
        if answer is None:
            return None
        answers.append((domain, answer))
        found = _policy_from(answers)
        if found is not None:
            break
    else:
        found = Policy(None)
    if not found.temporary:
        cache.keep(key, found, [(f"_dmarc.{domain}", "TXT") for domain, _ in answers])
    return found


async def discover(cache: DnsCache, from_domain: str) -> Policy:
    """§6.6.3: ``_dmarc.<from domain>``, else ``_dmarc.<organizational domain>``."""
    answers = []
    for domain in _candidates(from_domain):
        answers.append((domain, await cache.query(f"_dmarc.{domain}", "TXT")))
        found = _policy_from(answers)
        if found is not None:
            return found
    return Policy(None)


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str
    policy: str = "none"  # the record's policy for this domain (p or sp)
    disposition: str = "none"  # what to do: none, quarantine, reject
    record: DmarcRecord | None = None
    policy_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    sampled_out: bool = field(default=False)
    local_override: bool = False  # p=reject not applied: [auth] dmarc_enforce = false


def _aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def aligned_with(domain: str, from_domains_: Sequence[str]) -> bool:
    """Is ``domain`` (a DKIM d=) aligned with one of the From domains ``from_domains_``, in
    relaxed mode (§3.1.1: the same organizational domain; strict alignment implies it)?"""
    return any(_aligned(domain, d, "r") for d in from_domains_)


def evaluate(
    from_domains_: Sequence[str],
    policies: Mapping[str, Policy],
    spf: SpfResult | None,
    dkim_results: Sequence[DkimResult],
    rng: random.Random,
) -> DmarcResult:
    """The DMARC verdict for one message (pure, given the lookups): that of each of its
    :func:`author_domains` (``policies`` holds their policies), the strictest one."""
    domains = author_domains(from_domains_)
    if not domains:
        return DmarcResult("permerror", "", reason="no From domain")
    verdicts = [
        evaluate_domain(
            d, policies.get(d, Policy(None, temporary="not looked up")), spf, dkim_results, rng
        )
        for d in domains
    ]
    worst = min(verdicts, key=_strictness)
    if worst.result in ("none", "pass"):  # what would let the message through unchallenged
        if "" in from_domains_:
            return DmarcResult(
                "permerror", worst.from_domain, reason="a From address without a domain"
            )
        if len(set(from_domains_)) > len(domains):
            return DmarcResult("permerror", worst.from_domain, reason="too many From domains")
    return worst


def _strictness(result: DmarcResult) -> tuple[int, int]:
    """Lower is stricter: a fail (reject, quarantine, none), temperror, none, pass."""
    if result.result == "fail":
        return 0, POLICIES[::-1].index(result.disposition)
    return {"temperror": 1, "permerror": 2, "none": 3}.get(result.result, 4), 0


def evaluate_domain(
    domain: str,
    policy: Policy,
    spf: SpfResult | None,
    dkim_results: Sequence[DkimResult],
    rng: random.Random,
) -> DmarcResult:
    """The DMARC verdict for the From domain ``domain`` (A-labels) under ``policy``."""
    if policy.temporary:
        return DmarcResult("temperror", domain, reason=policy.temporary)
    record = policy.record
    if record is None:
        return DmarcResult("none", domain)
    spf_ok = bool(spf and spf.result == "pass" and _aligned(spf.domain, domain, record.aspf))
    dkim_ok = any(
        r.result == "pass" and _aligned(r.domain, domain, record.adkim) for r in dkim_results
    )
    # §6.6.3: sp applies when the record was found at the organizational domain for a
    # subdomain of it.
    requested = record.p if policy.domain == domain else record.sp
    base = {
        "from_domain": domain,
        "policy": requested,
        "record": record,
        "policy_domain": policy.domain,
        "spf_aligned": spf_ok,
        "dkim_aligned": dkim_ok,
    }
    if spf_ok or dkim_ok:
        return DmarcResult("pass", **base)  # type: ignore[arg-type]
    # An aligned SPF or DKIM result that DNS trouble left unknown might have passed: the
    # verdict is not known either, and a passing DNS problem must not refuse mail for good
    # (RFC 7489 §6.6.2 leaves such mail to local policy; RFC 8601 §2.7.1 temperror).
    spf_unknown = bool(
        spf and spf.result == "temperror" and _aligned(spf.domain, domain, record.aspf)
    )
    dkim_unknown = any(
        r.result == "temperror" and _aligned(r.domain, domain, record.adkim) for r in dkim_results
    )
    if spf_unknown or dkim_unknown:
        why = "SPF" if spf_unknown else "DKIM"
        return DmarcResult(
            "temperror",
            reason=f"an aligned {why} result is unknown (DNS)",
            **base,  # type: ignore[arg-type]
        )
    disposition = requested
    sampled_out = False
    if record.pct < 100 and rng.randrange(100) >= record.pct:
        # §6.6.4: outside the sample, apply the next milder policy.
        sampled_out = True
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(requested, "none")
    return DmarcResult(
        "fail",
        disposition=disposition,
        sampled_out=sampled_out,
        **base,  # type: ignore[arg-type]
    )
