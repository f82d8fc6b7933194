"""Interop with Postfix as a peer (issue 5): postroom delivers to Postfix after an MX lookup,
and accepts what Postfix relays to it. The private Postfix instance is the one bench/ sets up
(``benchlib.postfix``): its own loopback address, directory tree and log."""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, ServerFactory, insecure, need_tool, wait_until
from tests.dnszone import LoopbackDNS

POSTFIX_IP = "127.0.0.5"
POSTROOM_IP = "127.0.0.6"


def bench_postfix() -> Any:
    """bench/'s ``benchlib.postfix`` module (the private Postfix and its ports)."""
    need_tool("postfix")
    need_tool("openssl")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from benchlib import postfix as pf
    finally:
        sys.path.pop(0)
    return pf


@contextlib.contextmanager
def postfix_peer(
    tmp_path: Path, mail_users: list[str], transports: dict[str, str] | None = None
) -> Iterator[Path]:
    """bench/'s private Postfix for ``b.test`` on POSTFIX_IP, running; its root (``maillog``,
    ``etc/``, ``mail/``), stopped and removed afterwards."""
    pf = bench_postfix()
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from benchlib import tlscert
        from benchlib.proc import Cleanup
    finally:
        sys.path.pop(0)
    # Postfix refuses a tree it cannot traverse as its own user: not under pytest's 0700 tmp.
    root = Path("/tmp") / f"postroom-postfix-{tmp_path.name}"
    shutil.rmtree(root, ignore_errors=True)
    cleanup = Cleanup()
    try:
        cert, key = tlscert.make_cert(root / "tls", "mx.b.test")
        pf.start_postfix(
            root, POSTFIX_IP, "mx.b.test", "b.test", mail_users, cert, key, cleanup,
            transports=transports,
        )  # fmt: skip
        yield root
    finally:
        cleanup.run_all()
        shutil.rmtree(root, ignore_errors=True)


def wait_files(directory: Path, timeout: float = 30) -> list[bytes]:
    with contextlib.suppress(AssertionError):
        wait_until(lambda: list(directory.glob("*")), timeout, interval=0.2)
    return [p.read_bytes() for p in directory.glob("*")]


def test_postroom_to_postfix_and_back(server_factory: ServerFactory, tmp_path: Path) -> None:
    pf = bench_postfix()
    dns = LoopbackDNS()
    dns.mx("b.test", 10, "mx.b.test")
    dns.a("mx.b.test", POSTFIX_IP)
    srv = server_factory(
        domains=("a.test",),
        host=POSTROOM_IP,
        services=("smtp", "submission"),
        extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
        f"[delivery]\nport = {pf.PORT_SMTP}\n",
    )
    srv.add_user("alice@a.test", "pw")
    transports = {"a.test": f"smtp:[{POSTROOM_IP}]:{srv.ports['smtp']}"}
    with contextlib.ExitStack() as stack:
        stack.callback(dns.stop)
        root = stack.enter_context(postfix_peer(tmp_path, ["bob@b.test"], transports))
        log = root / "maillog"

        with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
            c.starttls(context=insecure())
            c.login("alice@a.test", "pw")
            c.sendmail(
                "alice@a.test",
                ["bob@b.test"],
                b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: to postfix\r\n\r\n"
                b"hello postfix\r\n",
            )
        delivered = wait_files(root / "mail" / "b.test" / "bob" / "new")
        assert len(delivered) == 1, log.read_text()[-3000:]
        assert b"Subject: to postfix" in delivered[0]
        assert b"by mx.a.test (postroom)" in delivered[0]

        with smtplib.SMTP(POSTFIX_IP, pf.PORT_SMTP, timeout=30) as c:
            c.sendmail(
                "bob@b.test",
                ["alice@a.test"],
                b"From: bob@b.test\r\nTo: alice@a.test\r\nSubject: from postfix\r\n\r\n"
                b"hello postroom\r\n",
            )
        msgs = srv.wait_messages("alice@a.test", 1, timeout=30)
        assert len(msgs) == 1, log.read_text()[-3000:]
        assert b"Subject: from postfix" in msgs[0]
        assert b"(Postfix)" in msgs[0]


def test_postfix_logs_in_to_submission_as_its_smarthost(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Postfix's SMTP client (Cyrus SASL) picks SCRAM-SHA-256, the strongest mechanism
    offered, and refuses an iteration count over 65,536 without falling back to PLAIN."""
    pf = bench_postfix()
    srv = server_factory(domains=("a.test",), host=POSTROOM_IP, services=("submission",))
    srv.add_user("alice@a.test", "smarthost-pw")
    with postfix_peer(tmp_path, []) as root:
        etc = root / "etc"
        smarthost = f"[{POSTROOM_IP}]:{srv.ports['submission']}"
        (etc / "sasl_passwd").write_text(f"{smarthost} alice@a.test:smarthost-pw\n")
        subprocess.run(
            [
                "postconf",
                "-c",
                str(etc),
                "-e",
                f"relayhost = {smarthost}",
                "smtp_sasl_auth_enable = yes",
                f"smtp_sasl_password_maps = texthash:{etc / 'sasl_passwd'}",
                "smtp_sasl_security_options = noanonymous",
                "smtp_sasl_tls_security_options = noanonymous",
                "smtp_tls_security_level = encrypt",
            ],
            check=True,
            timeout=30,
        )
        subprocess.run(["postfix", "-c", str(etc), "reload"], check=True, timeout=30)
        with smtplib.SMTP(POSTFIX_IP, pf.PORT_SMTP, timeout=30) as c:
            c.sendmail(
                "alice@a.test",
                ["alice@a.test"],
                b"From: alice@a.test\r\nSubject: through the smarthost\r\n\r\nhi\r\n",
            )
        msgs = srv.wait_messages("alice@a.test", 1, timeout=30)
        log = (root / "maillog").read_text(errors="replace")
        assert len(msgs) == 1, log[-3000:]
        assert b"through the smarthost" in msgs[0]
        assert "iteration-count is too big" not in log
