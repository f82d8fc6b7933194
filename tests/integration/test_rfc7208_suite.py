"""The RFC 7208 SPF test suite (``rfc7208-tests.yml`` from the pyspf source distribution) run
against ``postroom.auth.spf`` with each scenario's zone served by the loopback DNS server and
asked through the same cached resolver the server uses.

The suite is fetched at test time with ``pip download``; without network access the test
skips locally and fails in CI. Tests that are expected to fail are listed in ``KNOWN`` with
the reason (none at present).

Where the suite's data cannot be put on the wire exactly, the nearest DNS can carry is served:
a TXT record listed with no strings (``null-text``; illegal, RFC 1035 §3.3.14) is served with
one empty string, which is what the test means ("SPF should not crash").
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import AAAA, CNAME, MX, PTR, A

from postroom.auth import spf
from postroom.auth.lookup import DnsCache
from postroom.config import DNSConfig, parse_endpoint
from tests.dnszone import LoopbackDNS, _txt

PYSPF = "pyspf==2.0.14"
SUITE = "pyspf-2.0.14/test/rfc7208-tests.yml"
KNOWN: dict[str, str] = {}


def _fetch(cache_dir: Path) -> Path | None:
    target = cache_dir / "rfc7208-tests.yml"
    if target.exists():
        return target
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(cache_dir),
            PYSPF,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    sdists = list(cache_dir.glob("pyspf-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        return None
    with tarfile.open(sdists[0]) as tar:
        member = tar.extractfile(SUITE)
        if member is None:
            return None
        target.write_bytes(member.read())
    return target


def _load() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    cache_dir = Path(os.environ.get("POSTROOM_TEST_CACHE", "/tmp/postroom-test-cache"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _fetch(cache_dir)
    if path is None:
        return []
    out = []
    for scenario in yaml.safe_load_all(path.read_bytes()):
        for name, test in scenario["tests"].items():
            out.append((name, test, scenario["zonedata"]))
    return out


CASES = _load()


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS()
    yield server
    server.stop()


def _serve(dns: LoopbackDNS, zonedata: dict[str, list[Any]]) -> None:
    dns.zone.clear()
    dns.dead.clear()
    dns.ttls.clear()
    dns.slow.clear()
    for name, records in zonedata.items():
        dns.exists(name)
        # The suite's convention (as its pyspf runner has it): a name whose records list no
        # TXT publishes each of its SPF records as a TXT record too, listed after the others
        # (so after a TIMEOUT, which then answers TXT questions first).
        if "TIMEOUT" not in records and not any(
            isinstance(r, dict) and "TXT" in r for r in records
        ):
            records = [*records, *({"TXT": r["SPF"]} for r in records if "SPF" in r)]
        for record in records:
            if record == "TIMEOUT":
                dns.timeout(name)
                continue
            for rtype, value in record.items():
                if value == "TIMEOUT":
                    dns.timeout(name, rtype)
                elif rtype in ("TXT", "SPF"):
                    if value != "NONE":
                        strings = (value,) if isinstance(value, str) else tuple(value)
                        dns.add(name, rtype, _txt(strings))
                elif rtype == "A":
                    dns.add(name, rtype, A(value))
                elif rtype == "AAAA":
                    dns.add(name, rtype, AAAA(value))
                elif rtype == "MX":
                    dns.add(name, rtype, MX(value[1], value[0]))
                elif rtype == "PTR":
                    dns.add(name, rtype, PTR(value))
                elif rtype == "CNAME":
                    dns.add(name, rtype, CNAME(value))
                else:  # pragma: no cover - the suite has no other type
                    raise AssertionError(rtype)


def test_suite_was_fetched() -> None:
    if not CASES:
        if os.environ.get("CI") == "true":
            pytest.fail(f"could not fetch {PYSPF} (pip download) for the RFC 7208 suite")
        pytest.skip(f"could not fetch {PYSPF} (pip download) for the RFC 7208 suite")
    assert len(CASES) > 150


@pytest.mark.parametrize(
    ("name", "test", "zonedata"),
    [
        pytest.param(
            *case,
            id=case[0],
            marks=[pytest.mark.xfail(reason=KNOWN[case[0]], strict=True)]
            if case[0] in KNOWN
            else [],
        )
        for case in CASES
    ],
)
def test_rfc7208(
    dns: LoopbackDNS, name: str, test: dict[str, Any], zonedata: dict[str, list[Any]]
) -> None:
    _serve(dns, zonedata)
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=0.3))
    got = asyncio.run(
        spf.check(
            cache, test["host"], test["mailfrom"], test["helo"], default_explanation="DEFAULT"
        )
    )
    expected = test["result"]
    expected = [expected] if isinstance(expected, str) else expected
    assert got.result in expected, f"{test.get('description')}: {got}"
    if "explanation" in test:
        assert got.explanation == test["explanation"], got


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("v=spf1 exists:%{ir2}.x.mac.test -all", "permerror"),  # a digit after "r"
        ("v=spf1 exists:%{l-2}.x.mac.test -all", "permerror"),  # a digit after a delimiter
        ("v=spf1 exists:%{i2r}.x.mac.test -all", "fail"),  # well formed (no such name)
        ("v=spf1 exists:%{l1r-}.x.mac.test -all", "fail"),
        ("v=spf1 exists:%%{ir2}.x.mac.test -all", "fail"),  # "%%" then text, no macro
        ("v=spf1 exists:%{d0}.x.mac.test -all", "permerror"),  # §7.3: digits nonzero
        ("v=spf1 exists:%{d00r}.x.mac.test -all", "permerror"),
        ("v=spf1 exists:%{d01}.x.mac.test -all", "fail"),  # well formed: "test.x.mac.test"
    ],
)
def test_malformed_macros_are_a_permerror(dns: LoopbackDNS, record: str, result: str) -> None:
    """RFC 7208 §7.1: transformers = *DIGIT ["r"], then delimiters; anything else in the
    braces is a syntax error, so check_host() is a permerror (§4.6). pyspf read past it."""
    _serve(dns, {"mac.test": [{"TXT": record}]})
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=0.3))
    got = asyncio.run(spf.check(cache, "192.0.2.1", "a-b@mac.test", "h.mac.test"))
    assert got.result == result, got


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("v=spf1 exists:%{l}.u.test -all", "fail"),
        ("v=spf1 a:%{l1r}.u.test -all", "fail"),
        ("v=spf1 exists:%{d}.u.test -all", "pass"),  # no local part: looked up
        ("v=spf1 exists:%{L}.u.test -all", "fail"),
        ("v=spf1 include:%{l}.u.test -all", "fail"),  # no match: on to -all
        ("v=spf1 redirect=%{l}.u.test", "neutral"),
    ],
)
def test_a_local_part_that_is_no_ascii_matches_nothing(
    dns: LoopbackDNS, record: str, result: str
) -> None:
    """RFC 8616 §4: a term that expands a local part holding UTF-8 matches nothing. pyspf
    looked up its IDNA form ("jösé" as "xn--js-cja4c"): a record of that name passed the
    sender (sauth probe)."""
    zone = {"u.test": [{"TXT": record}]}
    for name in ("xn--js-cja4c.u.test", "u.test.u.test", "j%c3%b6s%c3%a9.u.test"):
        zone[name] = [{"A": "192.0.2.1"}, {"TXT": "v=spf1 +all"}]
    _serve(dns, zone)
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=0.3))
    got = asyncio.run(spf.check(cache, "192.0.2.1", "jösé@u.test", "h.u.test"))
    assert got.result == result, got


@pytest.mark.parametrize(
    ("dead", "result"),
    [
        (("1.2.0.192.in-addr.arpa", "PTR"), "fail"),  # no names: ptr does not match
        (("bad.ptr.test", "A"), "pass"),  # that name skipped, the next one validated
        (None, "pass"),
    ],
)
def test_dns_errors_in_ptr_are_no_match_or_a_skipped_name(
    dns: LoopbackDNS, dead: tuple[str, str] | None, result: str
) -> None:
    """RFC 7208 §5.5: "If a DNS error occurs while doing the PTR RR lookup, then this
    mechanism fails to match"; one during a name's A lookup skips that name. Both were a
    temperror (dnswire probe), and a CNAME loop behind a PTR name became one once CNAMEs
    given without their targets were followed (the suite's ptr-cname-loop)."""
    _serve(dns, {"ptr.test": [{"TXT": "v=spf1 ptr -all"}]})
    dns.ptr("1.2.0.192.in-addr.arpa", "bad.ptr.test")
    dns.ptr("1.2.0.192.in-addr.arpa", "good.ptr.test")
    dns.a("bad.ptr.test", "192.0.2.1")
    dns.a("good.ptr.test", "192.0.2.1")
    if dead is not None:
        dns.timeout(*dead)
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=0.3))
    got = asyncio.run(spf.check(cache, "192.0.2.1", "a@ptr.test", "h.ptr.test"))
    assert got.result == result, got


def test_a_quoted_local_part_with_an_at_is_checked_for_the_domain_after_the_last(
    dns: LoopbackDNS,
) -> None:
    """RFC 5321 §4.1.2: '"x@y"@fail.test' is of fail.test. pyspf split at the first "@" and
    checked 'y"@fail.test' (none), and that verdict was kept for fail.test: every later
    message from the client got spf=none, whatever fail.test says."""
    _serve(dns, {"fail.test": [{"TXT": "v=spf1 -all"}], "ok.test": [{"TXT": "v=spf1 +all"}]})
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=0.3))

    async def main() -> list[str]:
        senders = ['"x@y"@fail.test', "u@fail.test", '"a@b"@ok.test', "u@ok.test"]
        return [(await spf.check(cache, "192.0.2.1", s, "h.test")).result for s in senders]

    assert asyncio.run(main()) == ["fail", "fail", "pass", "pass"]


def test_the_hosts_of_mx_terms_cost_no_evaluation_each(
    dns: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each missing answer made one more evaluation of the whole policy: ten mx terms of ten
    hosts took 111, seconds of CPU with a long record. An MX answer's hosts are asked for
    together."""
    terms = " ".join(f"mx:m{i}.mx.test" for i in range(10))
    zone: dict[str, list[Any]] = {"mx.test": [{"TXT": f"v=spf1 {terms} -all"}]}
    for i in range(10):
        zone[f"m{i}.mx.test"] = [{"MX": [10, f"h{j}.m{i}.mx.test"]} for j in range(10)]
        for j in range(10):
            zone[f"h{j}.m{i}.mx.test"] = [{"A": f"192.0.2.{i * 10 + j + 1}"}]
    _serve(dns, zone)
    evaluations = 0
    evaluate = spf._evaluate

    def counted(*args: Any) -> Any:
        nonlocal evaluations
        evaluations += 1
        return evaluate(*args)

    monkeypatch.setattr(spf, "_evaluate", counted)
    dns.ttl("mx.test", "TXT", 3600)
    for i in range(10):
        dns.ttl(f"m{i}.mx.test", "MX", 3600)
        for j in range(10):
            dns.ttl(f"h{j}.m{i}.mx.test", "A", 60)
    now = [0.0]
    config = DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=1.0)
    cache = DnsCache(config, clock=lambda: now[0])
    got = asyncio.run(spf.check(cache, "192.0.2.100", "u@mx.test", "h.test"))
    assert got.result == "pass", got  # the last host of the last term
    assert evaluations <= 8, evaluations
    # The hosts' addresses gone from the cache, their MX answers not: asked for together too.
    now[0] += 120
    evaluations = 0
    got = asyncio.run(spf.check(cache, "192.0.2.99", "u@mx.test", "h.test"))
    assert got.result == "pass", got
    assert evaluations <= 3, evaluations


def test_a_name_after_the_term_that_matches_does_not_delay_the_verdict(dns: LoopbackDNS) -> None:
    """Missing address answers are guessed empty so that one evaluation finds what it may
    need; a name so found after the term that matches, under a server that never answers,
    held the verdict for the DNS time-out (two of them: temperror at check_timeout)."""
    _serve(dns, {"ok.test": [{"TXT": "v=spf1 a a:x.dead.test mx:dead.test -all"}]})
    dns.a("ok.test", "192.0.2.1")
    dns.timeout("x.dead.test")
    dns.timeout("dead.test")
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=2.0))
    started = time.monotonic()
    got = asyncio.run(spf.check(cache, "192.0.2.1", "u@ok.test", "h.test"))
    assert got.result == "pass", got
    assert time.monotonic() - started < 1.0


def test_a_check_that_ends_leaves_the_lookups_it_guessed_to_those_that_share_them(
    dns: LoopbackDNS,
) -> None:
    """A check that matched cancelled the lookups it had guessed; the cache shares a query
    among every check that asks for the same name, and the other check got temperror."""
    _serve(
        dns,
        {
            "one.test": [{"TXT": "v=spf1 a:m.one.test a:h.slow.test -all"}],
            "m.one.test": [{"A": "192.0.2.1"}],
            "two.test": [{"TXT": "v=spf1 a:h.slow.test -all"}],
            "h.slow.test": [{"A": "192.0.2.2"}],
        },
    )
    # one.test's check asks for h.slow.test first (a guess) and ends while it is asked for;
    # two.test's needs it meanwhile.
    dns.slow.update({"h.slow.test": 0.5, "m.one.test": 0.1, "two.test": 0.05})
    cache = DnsCache(DNSConfig(nameservers=(parse_endpoint(dns.nameserver),), timeout=2.0))

    async def main() -> list[str]:
        checks = (
            spf.check(cache, "192.0.2.1", "u@one.test", "h.test"),
            spf.check(cache, "192.0.2.2", "u@two.test", "h.test"),
        )
        return [verdict.result for verdict in await asyncio.gather(*checks)]

    assert asyncio.run(main()) == ["pass", "pass"]
