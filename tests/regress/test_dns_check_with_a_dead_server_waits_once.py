"""``postroom dns DOMAIN --check`` asked DNS one record after the other: with a dead name
server it waited ``[dns] timeout`` for each of its five records (50 s with the default
10 s) before saying ``unknown``. The questions are now asked together."""

from __future__ import annotations

import time

from tests.conftest import ServerFactory
from tests.dnszone import LoopbackDNS


def test_dns_check_against_a_dead_server_takes_one_timeout(server_factory: ServerFactory) -> None:
    dns = LoopbackDNS("127.0.0.135")
    try:
        for name in ("a.test", "_dmarc.a.test", "_domainkey.a.test"):
            dns.timeout(name)
        srv = server_factory(
            extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "2s"\n',
            start=False,
        )
        selectors = [
            line.split(".")[0]
            for line in srv.cli("dns", "a.test").stdout.splitlines()
            if "._domainkey." in line
        ]
        for selector in selectors:
            dns.timeout(f"{selector}._domainkey.a.test")
        start = time.monotonic()
        proc = srv.cli("dns", "a.test", "--check", check=False)
        took = time.monotonic() - start
    finally:
        dns.stop()
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("unknown") for line in lines), lines
    assert took < 6, took  # one 2 s timeout (and the interpreter's start), not five
