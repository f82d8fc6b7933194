"""Sender authentication against the reference implementations (issue 16's interop check).

A private Postfix instance (``benchlib.postfix``) with the Debian stack, OpenDKIM and OpenDMARC
as milters and policyd-spf as policy service (``benchlib.authstack``), is the peer of a
postroom server, both finding each other's records in the loopback DNS server:

- postroom signs a submission (Ed25519 and RSA), relays it to Postfix through the MX record,
  and OpenDKIM and OpenDMARC there judge it;
- Postfix signs a message from its own domain with OpenDKIM and relays it to postroom, which
  checks SPF, DKIM and DMARC.

The reference daemons resolve through /etc/resolv.conf and port 53: the DNS server listens on
port 53 of an address of its own and they run with a private /etc/resolv.conf (a mount
namespace; the machine's file is not touched). The domains are under ``.example``, not
``.test`` as elsewhere: the Unbound inside OpenDKIM answers ``.test`` names itself (RFC 6761).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import smtplib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT, Server, ServerFactory, insecure, need_tool
from tests.dnszone import LoopbackDNS

POSTFIX_IP = "127.0.0.8"
POSTROOM_IP = "127.0.0.9"
SUBMITTER_IP = "127.0.0.7"  # a host OpenDKIM signs for ("internal")
DNS_IP = "127.0.0.35"  # port 53: the reference daemons cannot be told another port


def _bench(name: str) -> ModuleType:
    """A module of bench/benchlib (the private Postfix and the stack around it)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(f"benchlib.{name}")
    finally:
        sys.path.pop(0)


def _need_private_resolver() -> None:
    for tool in ("postfix", "opendkim", "opendmarc", "policyd-spf", "unshare"):
        need_tool(tool)
    problem = _bench("authstack").unshare_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the interop test needs a private mount namespace: {problem}")
        pytest.skip(f"no private mount namespace here: {problem}")


def _header_fields(message: bytes, name: str) -> list[str]:
    """The unfolded values of every ``name`` field of the message's header section."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.splitlines()
        if line.lower().startswith(prefix)
    ]


def _dkim_verdicts(results: list[str]) -> dict[str, str]:
    """header.a -> dkim result, from Authentication-Results values (comments dropped)."""
    out = {}
    for value in results:
        for part in re.sub(r"\([^()]*\)", "", value).split(";")[1:]:
            result = re.search(r"\bdkim=(\w+)", part)
            algorithm = re.search(r"header\.a=([\w-]+)", part)
            if result and algorithm:
                out[algorithm.group(1)] = result.group(1)
    return out


class Peer:
    """The running pair and the zone they share."""

    def __init__(self, srv: Server, dns: LoopbackDNS, root: Path, mailbox: Path) -> None:
        self.srv = srv
        self.dns = dns
        self.root = root
        self.mailbox = mailbox

    def postfix_messages(self, count: int, timeout: float = 30) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(self.mailbox.glob("new/*"))
            if len(files) >= count or time.monotonic() > deadline:
                return [p.read_bytes() for p in files]
            time.sleep(0.1)

    def logs(self) -> str:
        parts = []
        for name in ("postfix/maillog", "opendkim/opendkim.log", "opendmarc/opendmarc.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts) + f"\n--- postroom\n{self.srv.log.read_text()[-2000:]}"


@pytest.fixture
def peer(server_factory: ServerFactory, tmp_path: Path) -> Iterator[Peer]:
    _need_private_resolver()
    authstack = _bench("authstack")
    pf = _bench("postfix")
    tlscert = _bench("tlscert")
    proc = _bench("proc")
    dns = LoopbackDNS(DNS_IP, 53)
    # Postfix refuses a tree it cannot traverse as its own user: not under pytest's 0700 tmp.
    root = Path("/tmp") / f"postroom-authpeer-{tmp_path.name}"
    shutil.rmtree(root, ignore_errors=True)
    cleanup = proc.Cleanup()
    try:
        srv = server_factory(
            domains=("a.example",),
            host=POSTROOM_IP,
            services=("smtp", "submission"),
            extra_toml=f'[dns]\nnameservers = ["{DNS_IP}:53"]\ntimeout = "2s"\n'
            f"[delivery]\nport = {pf.PORT_SMTP}\n",
        )
        srv.add_user("alice@a.example", "pw")
        srv.add_user("carol@a.example", "pw")
        dns.load_master(srv.cli("dns", "a.example").stdout)
        # postroom's connections leave from the loopback's first address.
        for ip in (POSTROOM_IP, "127.0.0.1"):
            dns.a("mx.a.example", ip)
        key = authstack.make_key("b.example", "pf2026", "rsa")
        dns.mx("b.example", 10, "mx.b.example")
        dns.a("mx.b.example", POSTFIX_IP)
        dns.txt("b.example", f"v=spf1 ip4:{POSTFIX_IP} -all")
        dns.txt("_dmarc.b.example", "v=DMARC1; p=reject")
        dns.txt(key.record_name, key.txt)
        resolv = authstack.write_resolv_conf(root / "resolv.conf", DNS_IP)
        milters = (
            authstack.start_opendkim(
                root / "opendkim",
                POSTFIX_IP,
                "mx.b.example",
                [key],
                [SUBMITTER_IP],
                resolv,
                cleanup,
            ),
            authstack.start_opendmarc(
                root / "opendmarc", POSTFIX_IP, "mx.b.example", [SUBMITTER_IP], resolv, cleanup
            ),
        )
        spf_conf = authstack.policyd_spf_conf(root / "policyd-spf.conf", "mx.b.example")
        cert, tls_key = tlscert.make_cert(root / "tls", "mx.b.example")
        server = pf.start_postfix(
            root / "postfix",
            POSTFIX_IP,
            "mx.b.example",
            "b.example",
            ["bob@b.example"],
            cert,
            tls_key,
            cleanup,
            transports={"a.example": f"smtp:[{POSTROOM_IP}]:{srv.ports['smtp']}"},
            auth=pf.AuthStack(milters, authstack.policyd_spf_service(spf_conf), resolv),
        )
        yield Peer(srv, dns, root, server.mailbox("bob@b.example"))
    finally:
        cleanup.run_all()
        dns.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(srv: Server, rcpt: str, subject: str) -> None:
    body = (
        f"From: Alice <alice@a.example>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@a.example>\r\n\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice@a.example", "pw")
        c.sendmail("alice@a.example", [rcpt], body)


def test_opendkim_and_opendmarc_pass_what_postroom_signs(peer: Peer) -> None:
    srv = peer.srv
    # postroom signs once it has seen its keys in DNS: wait for that on local mail.
    deadline = time.monotonic() + 30
    for n in range(1, 100):
        _submit(srv, "carol@a.example", f"local {n}")
        got = srv.wait_messages("carol@a.example", n)
        if len(got) == n and got[-1].count(b"DKIM-Signature:") == 2:
            break
        assert time.monotonic() < deadline, "postroom never signed"
        time.sleep(0.5)
    _submit(srv, "bob@b.example", "to the reference")
    got = peer.postfix_messages(1)
    assert len(got) == 1, peer.logs()
    results = _header_fields(got[0], "Authentication-Results")
    ours = [r for r in results if r.lower().startswith("mx.b.example")]
    dkim = _dkim_verdicts(ours)
    print("OpenDKIM/OpenDMARC/policyd-spf said:", *ours, sep="\n  ")
    # Debian 12's OpenDKIM 2.11 verifies RFC 8463 (Ed25519) signatures too.
    assert dkim == {"rsa-sha256": "pass", "ed25519-sha256": "pass"}, (ours, peer.logs())
    assert any("dmarc=pass" in r and "header.from=a.example" in r for r in ours), ours
    assert any("spf=pass" in r and "smtp.mailfrom=a.example" in r for r in ours), ours


def test_postroom_passes_what_opendkim_signs(peer: Peer) -> None:
    body = (
        b"From: Bob <bob@b.example>\r\nTo: <alice@a.example>\r\nSubject: from the reference\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <ref.1@b.example>\r\n\r\n"
        b"signed by OpenDKIM\r\n"
    )
    with smtplib.SMTP(POSTFIX_IP, 2525, timeout=30, source_address=(SUBMITTER_IP, 0)) as c:
        try:
            c.sendmail("bob@b.example", ["alice@a.example"], body)
        except smtplib.SMTPException as exc:
            raise AssertionError(peer.logs()) from exc
    got = peer.srv.wait_messages("alice@a.example", 1, timeout=30)
    assert len(got) == 1, peer.logs()
    assert b"DKIM-Signature:" in got[0] and b"s=pf2026" in got[0], got[0][:2000]
    results = _header_fields(got[0], "Authentication-Results")
    ours = [r for r in results if r.lower().startswith("mx.a.example;")]
    assert len(ours) == 1, results
    print("postroom said:", ours[0])
    for part in ("spf=pass smtp.mailfrom=b.example", "dkim=pass header.d=b.example", "dmarc=pass"):
        assert part in ours[0], ours[0]
