"""Issue 4: TLS on every port, SMTP AUTH only over TLS, submission policy, brute force."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
import time

import pytest

from tests.conftest import Server, ServerFactory, insecure, need_tool, scram_client_final


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(
        domains=("a.test",),
        services=("smtp", "submission", "submissions"),
        extra_toml='[auth]\nfailure_delay = "0.05s"\nlockout_failures = 10',
    )
    s.add_user("alice@a.test", "alice-pw")
    s.add_user("carol@a.test", "carol-pw")
    s.cli("alias", "add", "sales@a.test", "alice@a.test")
    return s


def test_submission_starttls_login_and_send(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=20) as c:
        c.ehlo()
        assert "auth" not in c.esmtp_features  # not before TLS
        assert c.mail("alice@a.test")[0] == 530
        c.rset()
        c.starttls(context=insecure())
        c.ehlo()
        assert "PLAIN" in c.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            c.login("alice@a.test", "wrong")
        assert exc.value.smtp_code == 535
        c.login("Alice@A.test", "alice-pw")
        code, text = c.mail("carol@a.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        c.rset()
        c.sendmail("sales@a.test", ["carol@a.test"], b"Subject: hi\r\n\r\nbody\r\n")
        c.sendmail("alice@a.test", ["carol@a.test"], b"Subject: hi\r\n\r\nbody\r\n")
    msgs = srv.wait_messages("carol@a.test", 2)
    assert len(msgs) == 2
    assert b"with ESMTPSA" in msgs[0]
    # Mail that stays here is stored as it came: no Date or Message-ID is added to it.
    assert msgs[0].endswith(b"\r\nSubject: hi\r\n\r\nbody\r\n")
    assert b"\r\nDate: " not in msgs[0] and b"\r\nMessage-ID: " not in msgs[0]


def test_submissions_implicit_tls(srv: Server) -> None:
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=insecure()) as c:
        c.login("alice@a.test", "alice-pw")
        c.sendmail("alice@a.test", ["carol@a.test"], b"Subject: 465\r\n\r\nbody\r\n")
    assert len(srv.wait_messages("carol@a.test", 1)) == 1


def test_auth_before_tls_is_refused(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as c:
        c.ehlo()
        code, text = c.docmd(
            "AUTH", "PLAIN " + base64.b64encode(b"\0alice@a.test\0alice-pw").decode()
        )
        assert (code, text[:6]) == (538, b"5.7.11")
        assert c.rcpt("x@remote.test")[0] == 503
        c.mail("x@r.test")
        assert c.rcpt("x@remote.test")[0] == 554


def test_mx_port_auth_allows_relay_and_checks_sender(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as c:
        c.starttls(context=insecure())
        c.login("alice@a.test", "alice-pw")
        assert c.mail("carol@a.test")[0] == 553
        c.rset()
        assert c.mail("alice@a.test")[0] == 250
        assert c.rcpt("someone@remote.test")[0] == 250


def test_scram_sha_256(srv: Server) -> None:
    """SCRAM-SHA-256 (RFC 7677) by hand, as smtplib has no SCRAM."""
    import secrets

    with smtplib.SMTP(srv.host, srv.ports["submission"]) as c:
        c.starttls(context=insecure())
        c.ehlo()
        assert "SCRAM-SHA-256" in c.esmtp_features["auth"]
        cnonce = secrets.token_hex(8)
        first_bare = f"n=alice@a.test,r={cnonce}"
        code, resp = c.docmd(
            "AUTH", "SCRAM-SHA-256 " + base64.b64encode(b"n,," + first_bare.encode()).decode()
        )
        assert code == 334
        server_first = base64.b64decode(resp).decode()
        final, expect = scram_client_final(b"alice-pw", first_bare, server_first)
        code, resp = c.docmd(base64.b64encode(final.encode()).decode())
        assert code == 334
        assert base64.b64decode(resp).decode() == expect
        assert c.docmd("")[0] == 235


def test_bad_base64_and_malformed_sasl_are_told_apart(srv: Server) -> None:
    """501 5.5.2 either way (RFC 4954 §4), but a response that decodes and is not a SASL
    message is not called undecodable: a client's author reads the text to find the bug."""
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=20) as c:
        c.starttls(context=insecure())
        c.ehlo()
        code, text = c.docmd("AUTH", "PLAIN !!!not-base64")
        assert (code, text) == (501, b"5.5.2 Cannot decode base64 response")
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"no nuls").decode())
        assert (code, text) == (501, b"5.5.2 Malformed authentication response")


def test_starttls_injection_is_not_executed(srv: Server) -> None:
    raw = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    raw.sendall(b"STARTTLS\r\nNOOP\r\n")
    assert f.readline().startswith(b"220")
    tls = insecure().wrap_socket(raw, server_hostname="mx.a.test")
    tls.settimeout(1.5)
    with pytest.raises(TimeoutError):
        tls.recv(100)  # nothing: the NOOP was discarded, not answered
    tls.sendall(b"NOOP\r\n")
    tls.settimeout(10)
    assert tls.recv(100).startswith(b"250")
    tls.close()


def test_swaks_tls_auth(srv: Server) -> None:
    swaks = need_tool("swaks")
    for mech in ("PLAIN", "LOGIN"):
        proc = subprocess.run(
            [
                swaks,
                "--server",
                f"{srv.host}:{srv.ports['submission']}",
                "--tls",
                "--auth",
                mech,
                "--auth-user",
                "alice@a.test",
                "--auth-password",
                "alice-pw",
                "--from",
                "alice@a.test",
                "--to",
                "carol@a.test",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(srv.wait_messages("carol@a.test", 2)) == 2


def test_curl_smtps_and_starttls(srv: Server, tmp_path: object) -> None:
    curl = need_tool("curl")
    mail = b"From: alice@a.test\r\nTo: carol@a.test\r\nSubject: curl\r\n\r\nvia curl\r\n"
    for url, extra in (
        (f"smtps://{srv.host}:{srv.ports['submissions']}", []),
        (f"smtp://{srv.host}:{srv.ports['submission']}", ["--ssl-reqd"]),
    ):
        proc = subprocess.run(
            [
                curl,
                "-sS",
                "-k",
                *extra,
                url,
                "--mail-from",
                "alice@a.test",
                "--mail-rcpt",
                "carol@a.test",
                "--user",
                "alice@a.test:alice-pw",
                "-T",
                "-",
            ],
            input=mail,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    assert len(srv.wait_messages("carol@a.test", 2)) == 2


def _auth_attempt(srv: Server, source: str, password: str) -> tuple[int, float]:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect((srv.host, srv.ports["submissions"]))
    tls = insecure().wrap_socket(s)
    f = tls.makefile("rb")
    f.readline()
    tls.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    t0 = time.monotonic()
    token = base64.b64encode(f"\0alice@a.test\0{password}".encode())
    tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
    code = int(f.readline()[:3])
    elapsed = time.monotonic() - t0
    tls.close()
    return code, elapsed


def test_brute_force_is_throttled_per_ip(srv: Server) -> None:
    results = [_auth_attempt(srv, "127.0.0.1", f"guess{i}") for i in range(20)]
    code, elapsed = results[-1]
    assert code == 454 or elapsed >= 0.5, results[-3:]
    assert results[0][0] == 535
    code, elapsed = _auth_attempt(srv, "127.0.0.2", "alice-pw")
    assert code == 235 and elapsed < 2
