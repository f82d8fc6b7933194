"""Issue 3: POP3 against a real server, with mail delivered through postroom's own SMTP port."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory, need_tool


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


MESSAGES = [
    b"Subject: one\r\n\r\nfirst message\r\n",
    b"Subject: two\r\n\r\n.leading dot\r\n..\r\n.\r\nend\r\n",
    "Subject: three\r\n\r\n8-bit \u00e9\u00e8 body\r\n".encode(),
]


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(
        domains=("a.test",),
        services=("smtp", "pop3", "pop3s"),
        extra_toml='[auth]\nfailure_delay = "0.05s"\nlockout_failures = 10',
    )
    s.add_user("alice@a.test", "pw")
    with smtplib.SMTP(s.host, s.ports["smtp"], timeout=20) as c:
        for msg in MESSAGES:
            c.sendmail("x@remote.test", ["alice@a.test"], msg)
    assert len(s.wait_messages("alice@a.test", 3)) == 3
    return s


def login(srv: Server, tls: str = "stls") -> poplib.POP3:
    if tls == "implicit":
        pop: poplib.POP3 = poplib.POP3_SSL(
            srv.host, srv.ports["pop3s"], context=insecure(), timeout=20
        )
    else:
        pop = poplib.POP3(srv.host, srv.ports["pop3"], timeout=20)
        pop.stls(context=insecure())
    pop.user("alice@a.test")
    pop.pass_("pw")
    return pop


def stored(srv: Server) -> list[bytes]:
    md = srv.maildir("alice@a.test")
    files = sorted([*md.glob("new/*"), *md.glob("cur/*")], key=lambda p: p.name)
    return [p.read_bytes() for p in files]


@pytest.mark.parametrize("tls", ["stls", "implicit"])
def test_retrieve_byte_for_byte(srv: Server, tls: str) -> None:
    pop = login(srv, tls)
    count, size = pop.stat()
    files = stored(srv)
    assert count == 3 and size == sum(len(f) for f in files)
    _resp, listing, _ = pop.list()
    for i, raw in enumerate(files, 1):
        _resp, lines, _octets = pop.retr(i)
        assert b"\r\n".join(lines) + b"\r\n" == raw
        assert listing[i - 1] == f"{i} {len(raw)}".encode()
        assert raw.endswith(MESSAGES[i - 1])
    pop.quit()


def test_uidl_stable_dele_rset_top(srv: Server) -> None:
    pop = login(srv)
    _r, uids1, _ = pop.uidl()
    _r, head, _ = pop.top(1, 0)
    assert head[-1] == b"" and b"Subject: one" in head and b"first message" not in head
    pop.dele(1)
    assert pop.stat()[0] == 2
    with pytest.raises(poplib.error_proto):
        pop.retr(1)
    pop.rset()
    assert pop.stat()[0] == 3
    pop.dele(2)
    pop.file.close()  # dropped, not QUIT: nothing is deleted
    pop.sock.close()
    time.sleep(0.3)
    pop = login(srv)
    _r, uids2, _ = pop.uidl()
    assert uids1 == uids2
    pop.dele(2)
    pop.quit()
    time.sleep(0.2)
    pop = login(srv)
    _r, uids3, _ = pop.uidl()
    assert [u.split()[1] for u in uids3] == [uids1[0].split()[1], uids1[2].split()[1]]
    pop.quit()
    assert len(stored(srv)) == 2


def test_second_login_is_in_use(srv: Server) -> None:
    first = login(srv)
    second = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
    second.user("alice@a.test")
    with pytest.raises(poplib.error_proto) as exc:
        second.pass_("pw")
    assert b"[IN-USE]" in exc.value.args[0]
    first.quit()
    second.user("alice@a.test")
    assert second.pass_("pw").startswith(b"+OK")
    second.quit()


def test_plaintext_refused_and_stls_injection(srv: Server) -> None:
    pop = poplib.POP3(srv.host, srv.ports["pop3"], timeout=20)
    assert "STLS" in pop.capa() and "USER" not in pop.capa()
    with pytest.raises(poplib.error_proto):
        pop.user("alice@a.test")
    pop.quit()
    raw = socket.create_connection((srv.host, srv.ports["pop3"]), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"+OK")
    raw.sendall(b"STLS\r\nNOOP\r\n")
    assert f.readline().startswith(b"+OK")
    tls = insecure().wrap_socket(raw)
    tls.settimeout(1.5)
    with pytest.raises(TimeoutError):
        tls.recv(100)
    tls.sendall(b"CAPA\r\n")
    tls.settimeout(10)
    assert tls.recv(1000).startswith(b"+OK")
    tls.close()


def test_curl_fetches(srv: Server) -> None:
    curl = need_tool("curl")
    files = stored(srv)
    for url in (
        f"pop3://{srv.host}:{srv.ports['pop3']}/2",
        f"pop3s://{srv.host}:{srv.ports['pop3s']}/2",
    ):
        proc = subprocess.run(
            [curl, "-sS", "-k", "--ssl-reqd", "--user", "alice@a.test:pw", url],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == files[1]


def test_fetchmail_fetches(srv: Server, tmp_path: Path) -> None:
    fetchmail = need_tool("fetchmail")
    rc = tmp_path / "fetchmailrc"
    out = tmp_path / "fetched"
    out.mkdir()
    rc.write_text(
        f"poll {srv.host} with proto POP3 port {srv.ports['pop3']}\n"
        f'  user "alice@a.test" there with password "pw" is "me" here\n'
        f"  sslproto TLS1.2+ no sslcertck keep\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$.$RANDOM'\"\n"
    )
    rc.chmod(0o600)
    proc = subprocess.run(
        [
            fetchmail,
            "-f",
            str(rc),
            "--nodetach",
            "--nosyslog",
            "-v",
            "--pidfile",
            str(tmp_path / "pid"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fetched = [p.read_bytes() for p in out.iterdir()]
    assert len(fetched) == 3
    bodies = b"".join(fetched).replace(b"\r\n", b"\n")
    for msg in MESSAGES:
        assert msg.split(b"\r\n\r\n")[1].replace(b"\r\n", b"\n") in bodies


def test_mpop_fetches(srv: Server, tmp_path: Path) -> None:
    mpop = need_tool("mpop")
    out = tmp_path / "mbox"
    proc = subprocess.run(
        [
            mpop,
            f"--host={srv.host}",
            f"--port={srv.ports['pop3']}",
            "--tls=on",
            "--tls-starttls=on",
            "--tls-certcheck=off",
            "--auth=user",
            "--user=alice@a.test",
            "--passwordeval=echo pw",
            "--keep=on",
            f"--delivery=mbox,{out}",
            "--uidls-file=" + str(tmp_path / "uidls"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes().count(b"\nFrom ") + out.read_bytes().startswith(b"From ") == 3


def _pop_login(srv: Server, source: str, password: str) -> tuple[bool, float, bytes]:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect((srv.host, srv.ports["pop3s"]))
    pop = insecure().wrap_socket(s)
    f = pop.makefile("rb")
    f.readline()
    t0 = time.monotonic()
    pop.sendall(b"USER alice@a.test\r\nPASS " + password.encode() + b"\r\n")
    f.readline()
    answer = f.readline()
    elapsed = time.monotonic() - t0
    pop.sendall(b"QUIT\r\n")
    pop.close()
    return answer.startswith(b"+OK"), elapsed, answer


def test_brute_force_throttled_per_ip(srv: Server) -> None:
    results = [_pop_login(srv, "127.0.0.1", f"guess{i}") for i in range(20)]
    ok, elapsed, answer = results[-1]
    assert not ok and (b"[SYS/TEMP]" in answer or elapsed >= 0.5), results[-1]
    assert b"[AUTH]" in results[0][2]
    ok, elapsed, _ = _pop_login(srv, "127.0.0.2", "pw")
    assert ok and elapsed < 2


def test_large_message_streams(server_factory: ServerFactory) -> None:
    s = server_factory(domains=("a.test",), services=("smtp", "pop3s"))
    s.add_user("alice@a.test", "pw")
    line = b"." + b"x" * 77 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (3 * 1024 * 1024 // len(line))
    with smtplib.SMTP(s.host, s.ports["smtp"], timeout=30) as c:
        c.sendmail("x@r.test", ["alice@a.test"], big)
    (raw,) = s.wait_messages("alice@a.test", 1, timeout=20)
    pop = poplib.POP3_SSL(s.host, s.ports["pop3s"], context=insecure(), timeout=30)
    pop.user("alice@a.test")
    pop.pass_("pw")
    assert pop.list(1).split()[2] == str(len(raw)).encode()
    _r, lines, _ = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == raw
    pop.quit()
