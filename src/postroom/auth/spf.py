"""SPF (RFC 7208): may this client IP send mail for the MAIL FROM domain (or the HELO name)?

The evaluation itself is pyspf's (the reference implementation of the RFC 7208 test suite:
macros, ``exp=``, ``redirect=``, the 10-lookup and 2-void-lookup limits of §4.6.4). pyspf asks
DNS synchronously; here it never waits: its ``dns()`` answers from the shared
:class:`~postroom.auth.lookup.DnsCache` (plus what this check fetched) and, on a miss, notes
the question and gives up. The missing answers are then fetched asynchronously and the
evaluation starts again from the top, until it needs nothing more. An SPF policy costs a few
DNS round trips (bounded by the limits above), each re-run a few hundred microseconds of CPU
for a policy of usual size (a missing MX or address answer is taken for empty until it comes,
so that one evaluation finds all of those it needs, not one a re-run), and the common case, a
cached policy, exactly one evaluation with no wait and no thread.

A verdict is a function of the client IP, the identity and the DNS answers it used, so it is
kept in the cache for as long as all of those answers are (:meth:`DnsCache.keep`): per IP and
domain when no record it read has a macro (a ``%``), per IP, sender, HELO name and receiver
otherwise (macros may name the local part, the HELO name or the receiver, RFC 7208 §7.2).
:func:`cached` answers from the cache alone, or None when something must be asked.

Security notes: the limits are pyspf's (RFC 7208 §4.6.4, each lookup and the whole check also
bounded in time by the caller); DNS data reaches pyspf only through :class:`Answer` objects.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from dataclasses import dataclass
from typing import Any

from postroom.auth.lookup import Answer, DnsCache, normalise

with warnings.catch_warnings():  # pyspf is old: keep its import quiet under -W error
    warnings.simplefilter("ignore")
    import spf as pyspf

# Each round fetches at least one new answer; RFC 7208 §4.6.4 bounds a policy to 10 terms
# with DNS lookups, 10 MX or PTR names each, 2 void lookups: far fewer than this.
MAX_ROUNDS = 150
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")


@dataclass(frozen=True, slots=True)
class SpfResult:
    """``result`` is an RFC 8601 §2.7.2 name; ``identity`` ``mailfrom`` or ``helo``."""

    result: str
    domain: str
    identity: str
    explanation: str = ""
    problem: str = ""


_GUESSED = ("A", "AAAA", "MX")  # answers that only decide whether a term matches
GUESS_WAIT = 0.2  # seconds at most a round waits, after the answer it needs, for new guesses


class _Miss(Exception):
    """An answer not yet fetched (raised from pyspf's ``dns``)."""


# RFC 7208 §7.1: macro-expand = "%{" macro-letter transformers *delimiter "}", transformers =
# *DIGIT ["r"], the digits nonzero (§7.3). pyspf reads "%{ir2}" as "%{ir}", "%{l-2}" as
# "%{l-}" and skips the term of a "%{d0}"; they are errors.
_MACRO = re.compile(r"%(?:%|\{([^}]*)\})")  # "%%" is a literal "%", not a macro's start
_MACRO_BODY = re.compile(r"[a-zA-Z](?:0*[1-9][0-9]*)?[rR]?[.\-+,/_=]*")
# What a domain-spec that takes a local part which is no ASCII expands to: a name DNS cannot
# carry (an empty label), so that its term matches nothing (RFC 8616 §4).
_NO_NAME = "no..name"


class _Query(pyspf.query):  # type: ignore[misc]
    """pyspf's query with its DNS answered from what is already known."""

    def __init__(self, known: dict[tuple[str, str], Answer], cache: DnsCache, **kw: Any) -> None:
        super().__init__(**kw)
        if self.ident == "mailfrom" and "@" in self.s:
            # The domain follows the last "@" (RFC 5321 §4.1.2: one in the local part is
            # quoted); pyspf took the first: '"x@y"@bank.test' was checked as 'y"@bank.test'
            # (none), and that verdict was kept for bank.test itself.
            local, _, self.o = self.s.rpartition("@")
            self.l, self.d = local or "postmaster", self.o
        self._known = known
        self._cache = cache
        self.missing: list[tuple[str, str]] = []
        self.used: list[tuple[tuple[str, str], Answer]] = []

    def expand(self, s: str, stripdot: bool = True) -> Any:
        local_part = False
        for m in _MACRO.finditer(s):
            body = m.group(1)
            if body is None:
                continue
            if not _MACRO_BODY.fullmatch(body):
                raise pyspf.PermError("invalid-macro-char", m.group(0))  # §4.6
            local_part = local_part or body[0] in "lLsS"
        if local_part and stripdot and not str(self.l).isascii():
            # A domain-spec (an explanation is expanded with stripdot=False): pyspf looked
            # up the local part's IDNA form, which a record may well name.
            return _NO_NAME
        return super().expand(s, stripdot)

    def dns_spf(self, domain: Any) -> Any:
        if domain == _NO_NAME:  # an include: of it matches nothing; a redirect= is neutral
            return "v=spf1"
        return super().dns_spf(domain)

    def validated_ptrs(self) -> list[Any]:
        """The client's validated names (``ptr``, ``%{p}``) as RFC 7208 §5.5 says: a DNS
        error looking up its PTR records leaves none (the mechanism fails to match, the macro
        says "unknown", §7.3), one looking up a name's addresses skips that name. pyspf made
        either a temperror. At most 10 names are looked up (§4.6.4)."""
        try:
            names = self.dns_ptr(self.i)
        except pyspf.TempError:
            return []
        out = []
        for name in names[: pyspf.MAX_PTR]:
            try:
                if self.cidrmatch(self.dns_a(name, self.A), self.cidrmax):
                    out.append(name)
            except pyspf.TempError:
                continue
        return out

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        if not name:
            raise pyspf.PermError("invalid query (empty name)")
        norm = normalise(str(name))
        if norm is None:
            return []  # as pyspf: a name DNS cannot carry has no records
        key = (norm, qtype)
        answer = self._known.get(key) or self._cache.peek(norm, qtype)
        if answer is None:
            self.missing.append(key)
            if qtype in _GUESSED:
                # Taken for empty for now: the evaluation goes on and finds what else it
                # may need, asked for meanwhile (its verdict is not used). Raised at once,
                # each missing MX and host address made one more evaluation of the whole
                # policy: ten mx terms of ten hosts 111 (seconds of CPU with a long record).
                return []
            # Noted as well as raised: pyspf swallows every exception around exp= lookups.
            raise _Miss(f"{norm}/{qtype}")
        self.used.append((key, answer))
        if answer.temporary:
            raise pyspf.TempError(answer.error or "DNS error")
        result = list(answer.records) if answer.status == "ok" else []
        if not result and not ignore_void:
            # RFC 7208 §4.6.4: at most two lookups may find nothing.
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _keys(ip: str, sender: str, helo: str, receiver: str, exp: str | None) -> tuple[Any, Any]:
    """The memo keys of a verdict: without macros, with them (see the module docstring)."""
    identity = "mailfrom" if sender else "helo"
    domain = (sender.rpartition("@")[2] if sender else helo).lower()
    return ("spf", ip, identity, domain, exp), (
        "spf",
        ip,
        sender.lower(),
        helo.lower(),
        receiver,
        exp,
    )


def _evaluate(
    known: dict[tuple[str, str], Answer],
    cache: DnsCache,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    default_explanation: str | None,
) -> tuple[SpfResult | None, _Query]:
    """One evaluation from what is known; (None, query) when ``query.missing`` answers."""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    query = _Query(known, cache, i=ip, s=sender, h=helo, receiver=receiver)
    if default_explanation is not None:
        query.set_default_explanation(default_explanation)
    try:
        result, _code, explanation = query.check()
    except _Miss:
        result, explanation = "", ""
    if query.missing:
        return None, query
    if result not in RESULTS:  # pyspf's older names
        result = {"unknown": "permerror", "error": "temperror"}.get(result, "permerror")
    verdict = SpfResult(
        result,
        query.o or domain,
        identity,
        explanation if result == "fail" else "",
        str(getattr(query, "prob", "") or ""),
    )
    general, exact = _keys(ip, sender, helo, receiver, default_explanation)
    macros = any(
        b"%" in part
        for (_name, qtype), answer in query.used
        if qtype in ("TXT", "SPF")
        for strings in answer.records
        for part in strings
    )
    cache.keep(exact if macros else general, verdict, [key for key, _ in query.used])
    return verdict, query


def _start(
    cache: DnsCache, ip: str, sender: str, helo: str, receiver: str, exp: str | None
) -> tuple[SpfResult | None, _Query | None]:
    """The kept verdict, or one evaluation from the cache: (verdict, its query or None), or
    (None, the query whose ``missing`` answers are wanted)."""
    identity = "mailfrom" if sender else "helo"
    if not (sender.rpartition("@")[2] if sender else helo):
        return SpfResult("none", "", identity, problem="no domain to check"), None
    for key in _keys(ip, sender, helo, receiver, exp):
        kept = cache.recall(key)
        if isinstance(kept, SpfResult):
            return kept, None
    return _evaluate({}, cache, ip, sender, helo, receiver, exp)


def cached(
    cache: DnsCache,
    ip: str,
    sender: str,
    helo: str,
    receiver: str = "unknown",
    default_explanation: str | None = None,
) -> SpfResult | None:
    """The verdict from the cache alone (kept, or evaluated); None if an answer is missing."""
    return _start(cache, ip, sender, helo, receiver, default_explanation)[0]


async def check(
    cache: DnsCache,
    ip: str,
    sender: str,
    helo: str,
    receiver: str = "unknown",
    default_explanation: str | None = None,
) -> SpfResult:
    """SPF for ``sender`` (``""`` for ``<>``: the HELO name is checked, RFC 7208 §2.4)."""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    verdict, query = _start(cache, ip, sender, helo, receiver, default_explanation)
    known: dict[tuple[str, str], Answer] = {}
    # Lookups under way: the first a round misses is needed (every answer before it was
    # real); those after it came of guesses (see _GUESSED), and are asked for meanwhile,
    # waited for at most GUESS_WAIT in the round that found them, and used if they came: a
    # name the policy lists after the term that matches, under a dead server, must not
    # delay the verdict (or make it a temperror at check_timeout). Never cancelled: the
    # cache shares a query with every check that asks for the same name.
    asked: dict[tuple[str, str], asyncio.Task[Answer]] = {}
    for _ in range(MAX_ROUNDS):
        if verdict is not None:
            return verdict
        assert query is not None  # (_start gives one whenever it gives no verdict)
        needed = query.missing[0]
        if needed in known:  # pragma: no cover - pyspf asked twice
            return SpfResult("temperror", domain, identity, problem="lookup loop")
        new = [key for key in query.missing if key not in known and key not in asked]
        for key in new:
            asked[key] = task = asyncio.ensure_future(cache.query(*key))
            _UNDER_WAY.add(task)
            task.add_done_callback(_UNDER_WAY.discard)
        known[needed] = await asked.pop(needed)
        guessed = [asked[key] for key in new if key in asked]
        if guessed:
            await asyncio.wait(guessed, timeout=GUESS_WAIT)
        for key, task in list(asked.items()):
            if task.done():
                known[key] = task.result()
                del asked[key]
        verdict, query = _evaluate(known, cache, ip, sender, helo, receiver, default_explanation)
    return SpfResult("permerror", domain, identity, problem="too many lookups")


_UNDER_WAY: set[asyncio.Task[Answer]] = set()  # (asyncio keeps only weak references to tasks)
