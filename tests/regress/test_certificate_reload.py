"""SIGHUP did not change the certificate on 465 and 995 (the context bound at start), could
not read a root-only key after the privilege drop (certbot's ``privkey.pem``, root 0600), and
blamed ``cert.pem`` for a key problem; a mismatched pair said NO_CERTIFICATE_ASSIGNED. Now
the supervisor reads the pair with its privileges, every listener serves the new pair to the
next handshake, an open session goes on, and errors name the file at fault."""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import Server, ServerFactory, free_port, insecure, run_cli

SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s")


def write_pair(directory: Path, serial_name: str) -> bytes:
    """A new certificate and key as an ACME client renews them; returns the leaf's DER."""
    leaf = trustme.CA().issue_cert("mx.a.test", common_name=serial_name)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("fullchain.pem", b"".join(b.bytes() for b in leaf.cert_chain_pems)),
        ("privkey.pem", leaf.private_key_pem.bytes()),
    ):
        tmp = directory / (name + ".new")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600 if name == "privkey.pem" else 0o644)
        tmp.replace(directory / name)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def served(srv: Server, service: str) -> bytes:
    """The DER certificate a new client of ``service`` is given."""
    host, port = srv.host, srv.ports[service]
    if service == "submissions":
        with smtplib.SMTP_SSL(host, port, timeout=20, context=insecure()) as c:
            return c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    if service == "pop3s":
        pop = poplib.POP3_SSL(host, port, timeout=20, context=insecure())
        der = pop.sock.getpeercert(binary_form=True)
        pop.quit()
        return der  # type: ignore[no-any-return]
    if service == "pop3":
        pop = poplib.POP3(host, port, timeout=20)
        pop.stls(context=insecure())
        der = pop.sock.getpeercert(binary_form=True)
        pop.quit()
        return der  # type: ignore[no-any-return]
    with smtplib.SMTP(host, port, timeout=20) as c:
        c.starttls(context=insecure())
        return c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]


def reload(srv: Server, count: int) -> str:
    """SIGHUP; wait until every worker has logged the reload (``count`` in all)."""
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while srv.log.read_text().count("configuration reloaded") < count:
        assert time.monotonic() < deadline, srv.log.read_text()
        time.sleep(0.05)
    return srv.log.read_text()


def tls_table(certs: Path) -> str:
    return f'[tls]\ncert = "{certs}/fullchain.pem"\nkey = "{certs}/privkey.pem"'


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return tmp_path / "live"


def test_sighup_changes_the_certificate_everywhere_and_keeps_open_sessions(
    server_factory: ServerFactory, certs: Path
) -> None:
    old = write_pair(certs, "first")
    srv = server_factory(
        services=SERVICES,
        extra_toml=f"workers = 2\n{tls_table(certs)}",
    )
    srv.add_user("alice@a.test")
    for service in SERVICES:
        assert served(srv, service) == old, service
    # A session open across the reload, on the implicit-TLS port.
    open_session = smtplib.SMTP_SSL(
        srv.host, srv.ports["submissions"], timeout=20, context=insecure()
    )
    open_session.ehlo()
    new = write_pair(certs, "renewed")
    reload(srv, 2)
    for service in SERVICES:
        for _ in range(4):  # new connections land on both workers
            assert served(srv, service) == new, service
    assert open_session.noop()[0] == 250
    assert open_session.sock.getpeercert(binary_form=True) == old  # type: ignore[union-attr]
    open_session.login("alice@a.test", "secret")
    open_session.sendmail("alice@a.test", ["alice@a.test"], b"Subject: across\r\n\r\nx\r\n")
    open_session.quit()
    assert len(srv.wait_messages("alice@a.test", 1)) == 1


def test_partial_failure_keeps_the_old_pair_and_says_which_file(
    server_factory: ServerFactory, certs: Path
) -> None:
    old = write_pair(certs, "first")
    srv = server_factory(
        services=("submissions", "smtp"),
        extra_toml=f'[tls]\ncert = "{certs}/fullchain.pem"\nkey = "{certs}/privkey.pem"',
    )
    # certbot renewed the certificate, but the key written is another one: a mismatch.
    other = certs.parent / "other"
    write_pair(other, "other")
    write_pair(certs, "renewed")
    shutil.copy(other / "privkey.pem", certs / "privkey.pem")
    # ...and the admin also added a domain in the same edit.
    srv.config.write_text(
        srv.config.read_text().replace('domains = ["a.test"]', 'domains = ["a.test", "b.test"]')
    )
    srv.add_user("bob@b.test")  # the CLI reads the file: b.test is local for it already
    log = reload(srv, 1)
    assert re.search(
        r"TLS certificate and key stay as they were: "
        r".*key .*privkey\.pem does not match certificate .*fullchain\.pem",
        log,
    ), log
    assert "NO_CERTIFICATE_ASSIGNED" not in log
    for service in ("submissions", "smtp"):
        assert served(srv, service) == old
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:  # the rest applied
        c.sendmail("x@r.test", ["bob@b.test"], b"Subject: b\r\n\r\nx\r\n")
    assert len(srv.wait_messages("bob@b.test", 1)) == 1
    # A missing key: the key is named, not the certificate.
    (certs / "privkey.pem").unlink()
    log = reload(srv, 2)
    assert re.search(r"cannot read key .*privkey\.pem", log), log
    # A listener change needs a restart, and says so, at every reload until then; put back,
    # it is what runs again: nothing to say (it was compared with the last reload).
    started = srv.config.read_text()
    srv.config.write_text(started.replace(f"{srv.ports['smtp']}", f"{free_port()}"))
    needs = "listen changed; it takes effect only after a restart"
    assert reload(srv, 3).count(needs) == 1
    assert reload(srv, 4).count(needs) == 2
    srv.config.write_text(started)
    assert reload(srv, 5).count(needs) == 2


def test_start_up_errors_name_the_file_at_fault(tmp_path: Path, certs: Path) -> None:
    write_pair(certs, "first")
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{tmp_path}/data"\n'
        f'[listen]\nsmtp = ["127.0.0.1:{free_port()}"]\n'
        f'[tls]\ncert = "{certs}/fullchain.pem"\nkey = "{certs}/missing.pem"\n'
    )
    p = run_cli("serve", config=cfg, check=False)
    assert p.returncode == 2
    # The contract's one line, naming the key at fault: "FILE: KEY: reason" (it named "tls").
    assert re.search(r"p\.toml: tls\.key: cannot read key .*missing\.pem", p.stderr), p.stderr
    assert "fullchain" not in p.stderr
    other = tmp_path / "other"
    write_pair(other, "other")
    cfg.write_text(cfg.read_text().replace(f"{certs}/missing.pem", f"{other}/privkey.pem"))
    p = run_cli("serve", config=cfg, check=False)
    assert p.returncode == 2
    assert "tls.key: key " in p.stderr and "does not match certificate" in p.stderr
    assert "NO_CERTIFICATE" not in p.stderr


@pytest.fixture
def open_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="postroom-reload-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_root_only_key_is_read_after_the_privilege_drop(open_base: Path) -> None:
    pwd.getpwnam("nobody")
    live = Path(tempfile.mkdtemp(prefix="postroom-certbot-"))  # root 0700, as /etc/letsencrypt
    try:
        old = write_pair(live, "first")
        ports = {s: free_port() for s in ("submissions", "pop3s", "submission")}
        cfg = open_base / "postroom.toml"
        listen = "\n".join(f'{s} = ["127.0.0.1:{p}"]' for s, p in ports.items())
        cfg.write_text(
            f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{open_base}/data"\n'
            f'user = "nobody"\n[listen]\n{listen}\n'
            f'[tls]\ncert = "{live}/fullchain.pem"\nkey = "{live}/privkey.pem"\n'
        )
        os.chmod(cfg, 0o600)  # root-only config too
        srv = Server(cfg, open_base / "data", "127.0.0.1", ports, ["a.test"], log=open_base / "log")
        srv.start()
        try:
            assert served(srv, "submissions") == old
            new = write_pair(live, "renewed")
            log = reload(srv, 1)
            assert "stay as they were" not in log, log
            for service in ports:
                assert served(srv, service) == new, service
        finally:
            srv.stop()
    finally:
        shutil.rmtree(live, ignore_errors=True)
