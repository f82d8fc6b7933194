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
domain, or domains beyond the limit, keep the message from passing (``permerror``). Which
domains a From field names is read as every mail reader might read it where it is no plain
list of mailboxes (:func:`_field_domains`): a forged author hides in what one parser reads
otherwise than the reader's own.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import email.quoprimime
import email.utils
import functools
import itertools
import random
import re
import unicodedata
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
# A From value that is a list of plain mailboxes (an address, alone or after a display name
# of words or a quoted string, and maybe a comment without "@"): both email parsers read their
# domains alike, and what a reader shows is those domains. A local part has no "=" nor "?" (a
# reader decodes '=?utf-8?q?ceo=40bank.test?=@evil.test' into one that shows bank.test).
# Possessive throughout: a pattern that backtracked held the event loop a minute for 6 KB of
# spaces.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]++"
_ADDR = r"[A-Za-z0-9!#$%&'*+/^_`{|}~.-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*+"
_NAME = rf'(?:"[^"\\\r\n]*+"|{_ATEXT}(?:[ \t]++{_ATEXT})*+)'
_COMMENT = r"(?:[ \t]*+\([^()\\\r\n@]*+\))?+"
_MAILBOX = rf"(?:{_NAME}?+[ \t]*+<{_ADDR}>|{_ADDR}){_COMMENT}"
_PLAIN_LIST = re.compile(rf"[ \t]*+{_MAILBOX}(?:[ \t]*+,[ \t]*+{_MAILBOX})*+[ \t]*+")
# Bounds of reading From fields, on the event loop (both email parsers take quadratic time on
# some input: seconds for 64 KB): octets of one field's value, and From fields, read (a message
# with more is refused: from_unreadable); characters the reader's parser gets (8 ms at worst);
# octets of a value whose reading is kept.
MAX_FROM_LENGTH = 4096
MAX_FROM_FIELDS = 3
_READ_AT_MOST = 512
_KEPT_AT_MOST = 1024
_AT_NAME = re.compile(r"@\s*+([^\s<>\[\]\",;:@]{1,300}+)")  # what follows an "@"
_FULL_STOPS = re.compile("[\u3002\uff0e\uff61]")  # what UTS 46 maps to "."
_ENCODED_WORD = re.compile(r"=\?([^?\s]*+)\?([bBqQ])\?([^?]*+)\?=")  # (a reader allows spaces)
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
    section ``head`` (the first MAX_FROM_FIELDS), in order ("" for an address without one)."""
    return list(_head_domains(head))


@lru_cache(maxsize=4)  # (a message's checks ask several times in a row)
def _head_domains(head: bytes) -> tuple[str, ...]:
    domains: list[str] = []
    for m in itertools.islice(_FROM.finditer(head), MAX_FROM_FIELDS):
        raw = m.group(1)
        domains += _kept_field_domains(raw) if len(raw) <= _KEPT_AT_MOST else _field_domains(raw)
    return tuple(domains)


def from_unreadable(head: bytes) -> bool:
    """Has the header section ``head`` more From fields than are read, or one too long to be
    read in bounded time (no real sender writes either: its message may be refused, as one
    with too many authors, RFC 7489 §6.6.1)?"""
    fields = [len(m.group(1)) for m in _FROM.finditer(head)]
    return len(fields) > MAX_FROM_FIELDS or any(n > MAX_FROM_LENGTH for n in fields)


def _field_domains(raw: bytes) -> tuple[str, ...]:
    """The domains of one From field's value ("" for an address without one). A plain list
    of mailboxes gives the domains of its addresses. Any other value is read as every reader
    might read it, and each domain any of them may show counts: that of Python's legacy
    address parser, that of the email package's own (which readers of the delivered message
    use), and every name after an "@", as written and with encoded-words decoded, comments
    taken out (:func:`_mentioned`). The legacy parser alone read ``ceo@bank.test x.evil.test`` as
    ``bank.testx.evil.test`` (the sender's own organizational domain: dmarc=pass) and found
    no domain in ``ceo@bank.test[`` (permerror, delivered); readers show ``ceo@bank.test``.
    (So a display name or comment naming an address counts in a value that is no plain list.)
    A value too long to read counts as no domain (and its message is refused when DMARC is
    enforced)."""
    if len(raw) > MAX_FROM_LENGTH:
        return ("",)
    value = raw.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    try:
        domains = [_author_domain(addr) for _name, addr in email.utils.getaddresses([value])]
    except RecursionError:  # (nested comments)
        domains = [""]
    if _PLAIN_LIST.fullmatch(value):
        return tuple(domains)
    read = list(domains)
    names = []
    if len(value) <= _READ_AT_MOST and "=?" not in value:
        # (Not with encoded-words: it looks their charsets up by name, see _decoded_word.
        # RecursionError, or a parser's bug: the names below count all the same.)
        with contextlib.suppress(Exception):
            shown = email.policy.default.header_factory("From", value).addresses
            names += [address.domain for address in shown]
    for name in names + _mentioned(value):
        read += _shown_domains(name)
    found = [d for d in dict.fromkeys(read) if d]
    # (An address without a domain, as the legacy parser read it, is kept: no pass then.)
    return (*found, "") if "" in domains or not found else tuple(found)


_kept_field_domains = lru_cache(maxsize=4096)(_field_domains)


def _mentioned(value: str) -> list[str]:
    """Every name after an "@" in a From value, read as loosely as any reader might: with
    its encoded-words decoded (also where RFC 2047 allows none), and its comments taken out
    both as a space and as nothing (``ceo@bank.test(x)evil.test``, ``ceo@(x)bank.test``)."""
    names: dict[str, None] = {}
    texts = [value]  # (as written too: decoding where no reader does may hide an address)
    for space in ("", " "):  # (an encoded-word glued to what follows, or apart)
        texts.append(_ENCODED_WORD.sub(functools.partial(_decoded_word, space=space), value))
    for text in texts:
        for read in (_without_comments(text, " "), _without_comments(text, "")):
            names.update(dict.fromkeys(_AT_NAME.findall(read)))
    return list(names)


def _decoded_word(m: re.Match[str], space: str = "") -> str:
    """An RFC 2047 encoded-word's text between two ``space``, or the word itself when it
    cannot be decoded. Read as UTF-8 whatever charset it names (what ``@`` and a domain are
    made of reads alike in every charset mail uses; a charset by its name would be looked up,
    and Python keeps every name it was asked for: unknown ones by the thousand filled
    memory)."""
    encoding, text = m.group(2), m.group(3)
    try:
        if encoding in "bB":
            text = "".join(text.split())
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        else:
            data = email.quoprimime.header_decode(text).encode("latin-1", "replace")
    except ValueError:
        return m.group(0)
    decoded = data.decode("utf-8", "replace").replace("(", " ").replace(")", " ")
    return space + decoded + space  # (no comment made of decoded text: it would hide text)


def _without_comments(text: str, instead: str) -> str:
    """``text`` with each (nested) comment replaced by ``instead`` and each quoted-pair's
    backslash dropped (RFC 5322 §3.2.1, §3.2.2), in one pass."""
    out: list[str] = []
    depth = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(instead)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _shown_domains(name: str) -> list[str]:
    """The domains a reader may take ``name`` for (A-labels): as written (display forms
    mapped as UTS 46 maps them: ``bank。test``, fullwidth letters, which an address may not
    use but a display shows), and without the characters that are no letter, digit, dot or
    hyphen (``bank.test<LRM>``, a Braille blank, unassigned code points, combining marks),
    which may draw nothing."""
    if name.lstrip().startswith("["):
        return []  # an address literal is no domain (no policy can be looked up for it)
    bare = "".join(
        ch
        for ch in _FULL_STOPS.sub(".", name)
        if (ch.isascii() and (ch.isalnum() or ch in ".-"))
        or (not ch.isascii() and unicodedata.category(ch)[0] in "LN")
    )
    found = []
    for spelt in dict.fromkeys((name, bare)):
        try:
            if display_form(spelt):
                spelt = idna.encode(spelt, uts46=True).decode()
            domain = normalise_domain(spelt)
        except ValueError:  # (idna.IDNAError is one)
            continue
        if not domain.startswith("[") and not domain.replace(".", "").isdigit():
            found.append(domain)  # (no address literal, bracketed or not)
    return found


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
