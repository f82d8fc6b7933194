"""Issue 3: POP3 against a real server, with mail delivered through postroom's own SMTP port."""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, ServerFactory, insecure, need_tool, wait_until

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


def login_when_free(srv: Server, user: str = "alice@a.test", timeout: float = 10) -> poplib.POP3:
    """Log in once the mailbox is no longer locked by an ending session ([IN-USE])."""

    def attempt() -> poplib.POP3 | None:
        pop = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
        pop.user(user)
        try:
            pop.pass_("pw")
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0], exc
            pop.quit()
            return None
        return pop

    return wait_until(attempt, timeout, f"{user}'s mailbox to be free")


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
    """alice's messages as POP3 serves them (the files have LF line ends)."""
    return srv.messages("alice@a.test")


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
    pop = login_when_free(srv)  # the dropped session lets go of the lock
    _r, uids2, _ = pop.uidl()
    assert uids1 == uids2
    pop.dele(2)
    pop.quit()  # RFC 1939 §6: the +OK comes once the deletions are made
    pop = login(srv)
    _r, uids3, _ = pop.uidl()
    assert [u.split()[1] for u in uids3] == [uids1[0].split()[1], uids1[2].split()[1]]
    pop.quit()
    assert len(stored(srv)) == 2


def test_quit_then_close_still_deletes_everything(srv: Server) -> None:
    # RFC 1939 §6: QUIT starts UPDATE; a client that closes without reading the +OK must not
    # leave it half done (the maildrop and its lock were released under the running update).
    md = srv.maildir("alice@a.test")
    for i in range(400):  # enough that the update is still running when the close comes
        (md / "new" / f"1800000000.M{i}.x,S=8,W=8").write_bytes(b"x: y\r\n\r\n")
    pop = login(srv, "implicit")
    count = pop.stat()[0]
    pop.sock.sendall(b"".join(b"DELE %d\r\n" % n for n in range(2, count + 1)) + b"QUIT\r\n")
    pop.file.close()
    pop.sock.close()
    wait_until(lambda: len([*md.glob("new/*"), *md.glob("cur/*")]) == 1)
    assert len(stored(srv)) == 1
    pop = login(srv)  # and the lock was let go
    assert pop.stat()[0] == 1
    pop.quit()
    assert "Traceback" not in srv.log.read_text()


def test_a_session_the_server_ended_frees_the_mailbox_at_once(srv: Server) -> None:
    """ "Too many errors" ends the session, and its socket lingers for 2 s (half-closed, so a
    client still sending reads the last reply): the mailbox stayed locked until the socket
    closed, and the next login in those 2 s got [IN-USE] (RFC 1939 §8: the lock is the
    session's; hostile probe)."""
    first = login(srv, "implicit")
    sock = first.sock
    sock.sendall(b"RETR 0\r\n" * 25)  # no DELE: nothing is to be applied
    end = time.monotonic() + 10
    said = b""
    while b"too many errors" not in said and time.monotonic() < end:
        said += sock.recv(65536)
    assert b"too many errors" in said
    second = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
    second.user("alice@a.test")
    assert second.pass_("pw").startswith(b"+OK")  # the first's socket is still open
    assert second.stat()[0] == 3
    second.quit()
    sock.close()


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
    # The admin learns why a right password got no session, and on which port.
    refused = "login refused: user=alice@a.test, client=[127.0.0.1], service=pop3s: mailbox in use"
    wait_until(lambda: refused in srv.log.read_text(), 5)
    (line,) = [ln for ln in srv.log.read_text().splitlines() if refused in ln]
    assert "postroom/pop3s[" in line
    logins = [ln for ln in srv.log.read_text().splitlines() if "login: user=alice" in ln]
    assert any("postroom/pop3s[" in ln and "service=pop3s" in ln for ln in logins)


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


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_fetchmail_fetches_byte_for_byte(srv: Server, tmp_path: Path) -> None:
    fetchmail = need_tool("fetchmail")
    rc = tmp_path / "fetchmailrc"
    out = tmp_path / "fetched"
    out.mkdir()
    # "invisible": no Received header of its own; the MDA gets LF line ends (stripcr).
    rc.write_text(
        f"set invisible\n"
        f"poll {srv.host} with proto POP3 port {srv.ports['pop3']} uidl\n"
        f'  user "alice@a.test" there with password "pw" is "me" here\n'
        f"  sslproto TLS1.2+ no sslcertck keep\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
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
    assert "STLS" in proc.stdout  # fetchmail upgraded on its own
    fetched = sorted(p.read_bytes() for p in out.iterdir())
    assert fetched == sorted(lf(m) for m in stored(srv))


def test_mpop_fetches_byte_for_byte(srv: Server, tmp_path: Path) -> None:
    mpop = need_tool("mpop")
    out = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    common = [
        mpop,
        f"--host={srv.host}",
        f"--port={srv.ports['pop3']}",
        "--tls=on",
        "--tls-starttls=on",
        "--tls-certcheck=off",
        "--user=alice@a.test",
        "--passwordeval=echo pw",
        "--keep=on",
        "--received-header=off",
        f"--delivery=maildir,{out}",
        "--uidls-file=" + str(tmp_path / "uidls"),
    ]
    for auth in ("user", "plain"):  # USER/PASS, then SASL PLAIN (RFC 5034)
        proc = subprocess.run(
            [*common, f"--auth={auth}", "--only-new=off"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    fetched = sorted(p.read_bytes() for p in (out / "new").iterdir())
    assert fetched == sorted(lf(m) for m in stored(srv) * 2)


def _pop_login(
    srv: Server, source: str, password: str, user: str = "alice@a.test"
) -> tuple[bool, float, bytes]:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect((srv.host, srv.ports["pop3s"]))
    pop = insecure().wrap_socket(s)
    f = pop.makefile("rb")
    f.readline()
    t0 = time.monotonic()
    pop.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
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


def test_a_right_password_caught_by_the_lockout_in_the_queue_is_not_called_wrong(
    srv: Server,
) -> None:
    # 24 wrong passwords at once from one IP, the right one just after: the IP reaches the
    # lockout (10) while the right one waits for its check. It was answered [AUTH], as if
    # the password were wrong; it is [SYS/TEMP] (or +OK, had its turn come first).
    source = "127.0.5.9"
    with ThreadPoolExecutor(25) as pool:
        guesses = [pool.submit(_pop_login, srv, source, f"guess{i}") for i in range(24)]
        time.sleep(0.3)
        ok, _, answer = _pop_login(srv, source, "pw")
        assert not any(f.result()[0] for f in guesses)
    assert ok or answer.startswith(b"-ERR [SYS/TEMP]"), answer


def test_a_known_client_logs_in_ahead_of_a_guessing_campaign(srv: Server) -> None:
    # 300 IPs sending one wrong password each held a correct login back 21.6 s: argon2 checks
    # queued first come, first served. A login that succeeded from an IP before goes first.
    # (Each guess names another user, so that no failure is delayed: the campaign lasts as
    # long as its checks.)
    ok, _, _ = _pop_login(srv, "127.0.3.1", "pw")
    assert ok
    with ThreadPoolExecutor(48) as pool:
        start = time.monotonic()
        campaign = [
            pool.submit(_pop_login, srv, f"127.0.4.{i}", "guess", f"u{i}@a.test")
            for i in range(1, 49)
        ]
        time.sleep(0.5)  # the campaign's checks are queued
        ok, mine, answer = _pop_login(srv, "127.0.3.1", "pw")
        assert ok, answer
        assert not any(guessed for guessed, _, _ in (f.result() for f in campaign))
        drained = time.monotonic() - start
    assert mine < (drained - 0.5) / 4, (mine, drained)


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


def test_curl_sasl_and_list(srv: Server) -> None:
    curl = need_tool("curl")
    base = f"pop3s://{srv.host}:{srv.ports['pop3s']}/"
    files = stored(srv)
    for mech in ("PLAIN", "LOGIN"):
        proc = subprocess.run(
            [
                curl,
                "-sS",
                "-k",
                "--user",
                "alice@a.test:pw",
                "--login-options",
                f"AUTH={mech}",
                base + "1",
            ],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == files[0]
    proc = subprocess.run(
        [curl, "-sS", "-k", "--user", "alice@a.test:pw", base], capture_output=True, timeout=60
    )
    assert proc.stdout == b"".join(f"{i} {len(f)}\r\n".encode() for i, f in enumerate(files, 1))
    bad = subprocess.run(
        [curl, "-sS", "-k", "--user", "alice@a.test:nope", base], capture_output=True, timeout=60
    )
    assert bad.returncode != 0


def raw_pop(srv: Server, port: str = "pop3s") -> tuple[ssl.SSLSocket, object]:
    sock = insecure().wrap_socket(socket.create_connection((srv.host, srv.ports[port]), 20))
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")
    return sock, f


def test_auth_plain_raw_and_capa_under_tls(srv: Server) -> None:
    sock, f = raw_pop(srv)
    sock.sendall(b"CAPA\r\n")
    caps = []
    while (line := f.readline()) != b".\r\n":  # type: ignore[attr-defined]
        caps.append(line.rstrip(b"\r\n"))
    assert caps[0].startswith(b"+OK") and b"STLS" not in caps
    assert {
        b"USER",
        b"TOP",
        b"UIDL",
        b"SASL PLAIN LOGIN SCRAM-SHA-256",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"UTF8 USER",
    } <= set(caps)
    cred = base64.b64encode(b"\0alice@a.test\0pw")
    # Pipelined (RFC 2449 PIPELINING): AUTH with an initial response, then STAT and QUIT.
    sock.sendall(b"AUTH PLAIN " + cred + b"\r\nSTAT\r\nQUIT\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    assert f.readline().split()[:2] == [b"+OK", b"3"]  # type: ignore[attr-defined]
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    sock.close()


def test_wrong_password_and_unknown_user_look_the_same(srv: Server) -> None:
    answers = []
    for user in ("alice@a.test", "nobody@a.test", "alice@elsewhere.test"):
        sock, f = raw_pop(srv)
        t0 = time.monotonic()
        sock.sendall(f"USER {user}\r\nPASS wrong\r\n".encode())
        f.readline()  # type: ignore[attr-defined]
        answers.append((f.readline(), time.monotonic() - t0))  # type: ignore[attr-defined]
        sock.close()
    assert len({a for a, _ in answers}) == 1 and answers[0][0].startswith(b"-ERR [AUTH]")
    times = [t for _, t in answers]
    assert max(times) - min(times) < 0.5, times


def test_plaintext_login_when_allowed(server_factory: ServerFactory) -> None:
    s = server_factory(services=("pop3",), extra_toml="[auth]\nallow_plaintext = true")
    s.add_user("bob@a.test", "pw")
    pop = poplib.POP3(s.host, s.ports["pop3"], timeout=20)
    assert "USER" in pop.capa()
    pop.user("bob@a.test")
    pop.pass_("pw")
    assert pop.stat() == (0, 0)
    pop.quit()


def put(md: Path, name: str, data: bytes) -> None:
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    (md / "tmp" / name).write_bytes(data)
    (md / "tmp" / name).rename(md / "new" / name)


def test_foreign_lf_files_exact_octets(server_factory: ServerFactory) -> None:
    """Files written by other tools: LF line ends, no size in the name, large and small."""
    s = server_factory(services=("pop3s",))
    s.add_user("carol@a.test", "pw")
    md = s.maildir("carol@a.test")
    small = b"From: x\nSubject: lf\n\n.dot line\nlast line without end"
    big = b"Subject: big lf\n\n" + b"".join(b".%06d\n" % i + b"\r\n" for i in range(120_000))
    put(md, "1700000001.M1P1.other", small)
    put(md, "1700000002.M2P2.other", big)
    for _ in range(2):  # the second session takes the sizes from the cache
        pop = poplib.POP3_SSL(s.host, s.ports["pop3s"], context=insecure(), timeout=30)
        pop.user("carol@a.test")
        pop.pass_("pw")
        for i, raw in enumerate((small, big), 1):
            size = int(pop.list(i).split()[2])
            _r, lines, _ = pop.retr(i)
            crlf = b"\r\n".join(lines) + b"\r\n"
            assert crlf == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + (
                b"\r\n" if not raw.endswith(b"\n") else b""
            )
            # RFC 1939: the size is that of the message as sent, CRLF included.
            assert size == len(crlf)
        _r, head, _ = pop.top(2, 2)
        assert head == [b"Subject: big lf", b"", b".000000", b""]
        pop.quit()


def test_ten_thousand_messages(server_factory: ServerFactory) -> None:
    s = server_factory(services=("pop3s",))
    s.add_user("dave@a.test", "pw")
    md = s.maildir("dave@a.test")
    for sub in ("tmp", "new", "cur"):
        md.joinpath(sub).mkdir(parents=True, exist_ok=True)
    msg = b"Subject: m\r\n\r\n" + b"x" * 1000 + b"\r\n"
    for i in range(10_000):
        (md / "new" / f"{1700000000 + i}.Q{i:05d}_0.host,S={len(msg)}").write_bytes(msg)
    pop = poplib.POP3_SSL(s.host, s.ports["pop3s"], context=insecure(), timeout=60)
    pop.user("dave@a.test")
    t0 = time.perf_counter()
    pop.pass_("pw")
    t1 = time.perf_counter()
    count, size = pop.stat()
    t2 = time.perf_counter()
    _r, listing, _ = pop.list()
    t3 = time.perf_counter()
    _r, uids, _ = pop.uidl()
    t4 = time.perf_counter()
    assert count == 10_000 and size == 10_000 * len(msg)
    assert len(listing) == len(uids) == 10_000 and uids[-1] == b"10000 1700009999.Q09999_0.host"
    pop.quit()
    print(
        f"\n10,000 messages: login {1000 * (t1 - t0):.0f} ms (argon2 + snapshot), "
        f"STAT {1000 * (t2 - t1):.1f} ms, LIST {1000 * (t3 - t2):.1f} ms, "
        f"UIDL {1000 * (t4 - t3):.1f} ms"
    )


def test_storage_error_is_sys_temp(server_factory: ServerFactory) -> None:
    s = server_factory(services=("pop3s",))
    s.add_user("erin@a.test", "pw")
    md = s.maildir("erin@a.test")
    (md / "cur").rmdir()
    (md / "cur").write_bytes(b"not a directory")  # the disk says no
    pop = poplib.POP3_SSL(s.host, s.ports["pop3s"], context=insecure(), timeout=20)
    pop.user("erin@a.test")
    with pytest.raises(poplib.error_proto) as exc:
        pop.pass_("pw")
    assert exc.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    assert "USER" in pop.capa()  # the session goes on
    pop.quit()
    # The user is told only "try again": the log says why (it said nothing).
    wait_until(lambda: "POP3 mailbox of erin@a.test cannot be opened" in s.log.read_text(), 5)


def test_idle_timeout_and_shutdown(server_factory: ServerFactory) -> None:
    s = server_factory(services=("pop3s",), extra_toml='[limits]\npop3_idle_timeout = "1s"')
    sock, f = raw_pop(s)
    sock.settimeout(15)  # the server speaks first, after its 1 s
    assert f.readline().startswith(b"-ERR")  # type: ignore[attr-defined]
    assert f.readline() == b""  # type: ignore[attr-defined]
    sock.close()
    s2 = server_factory(services=("pop3s",))
    sock, f = raw_pop(s2)
    assert s2.stop() == 0
    assert f.readline().startswith(b"-ERR [SYS/TEMP]")  # type: ignore[attr-defined]
    sock.close()


def test_a_session_that_never_logs_in_ends_however_busy(server_factory: ServerFactory) -> None:
    """Each command restarts the idle clock; before a login the session has the time in all."""
    s = server_factory(services=("pop3",), extra_toml='[limits]\npop3_idle_timeout = "2s"')
    sock = socket.create_connection((s.host, s.ports["pop3"]), 20)
    sock.settimeout(0.25)
    start = time.monotonic()
    closed_at = None
    while closed_at is None and time.monotonic() - start < 10:
        try:
            sock.sendall(b"CAPA\r\n")
            while sock.recv(65536):  # the greeting, CAPA's answers, then EOF once closed
                pass
            closed_at = time.monotonic()
        except TimeoutError:
            continue
        except OSError:
            closed_at = time.monotonic()
    sock.close()
    assert closed_at is not None and closed_at - start < 6


def test_a_logged_in_session_trickling_a_command_times_out(server_factory: ServerFactory) -> None:
    """After the login there is no limit in all, so a command sent an octet at a time must not
    restart the idle clock with each octet (it held the session for ever)."""
    s = server_factory(services=("pop3s",), extra_toml='[limits]\npop3_idle_timeout = "2s"')
    s.add_user("tom@a.test", "pw")
    sock, f = raw_pop(s)
    sock.sendall(b"USER tom@a.test\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    sock.sendall(b"PASS pw\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    start = time.monotonic()
    sock.settimeout(0.5)
    heard = b""
    for octet in b"NOOP" + b" " * 40 + b"\r\n":  # 0.5 s apart: 22 s in all
        try:
            sock.sendall(bytes([octet]))
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        heard += chunk
        if not chunk:
            break
    assert time.monotonic() - start < 8 and heard.startswith(b"-ERR"), heard
    sock.close()


def test_a_client_still_reading_a_long_answer_is_not_idle(server_factory: ServerFactory) -> None:
    """The idle clock ran while the client was still reading a long RETR over a slow link:
    once the answer was all in the kernel's buffers, its DELE got the autologout; while the
    server's own buffer was full, it was reset in the middle of the message. Either way
    nothing was deleted. The server now sees the client take in what it holds for it."""
    s = server_factory(services=("pop3s",), extra_toml='[limits]\npop3_idle_timeout = "1s"')
    s.add_user("tom@a.test", "pw")
    line = b"z" * 98 + b"\n"
    # Over the kernel's 4 MiB send buffer: its writer is woken only after a third drained.
    msg = b"Subject: big\n\n" + line * (5 * 1024 * 1024 // len(line))
    put(s.maildir("tom@a.test"), f"1700000000.Q1_0.host,S={len(msg)}", msg)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the data waits on our side
    raw.settimeout(20)
    raw.connect((s.host, s.ports["pop3s"]))
    sock = insecure().wrap_socket(raw)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    for command in (b"USER tom@a.test", b"PASS pw"):
        sock.sendall(command + b"\r\n")
        assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    sock.sendall(b"RETR 1\r\n")
    start, got = time.monotonic(), 0
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    while (chunk := f.readline(65536)) != b".\r\n":  # type: ignore[attr-defined]
        assert chunk, "closed in the middle of the answer"
        got += len(chunk)
        if got % (64 * 1024) < len(chunk):
            time.sleep(0.125)  # 512 KB/s: 10 s in all, far over the 1 s time-out
    assert time.monotonic() - start > 5
    sock.sendall(b"DELE 1\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    sock.sendall(b"QUIT\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    sock.close()
    md = s.maildir("tom@a.test")
    assert not [*(md / "new").iterdir(), *(md / "cur").iterdir()]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_50mb_retr_streams(server_factory: ServerFactory) -> None:
    """RETR of a 50 MB message: exact octets, and the server's peak memory grows far less."""
    s = server_factory(services=("pop3s",))
    s.add_user("fred@a.test", "pw")
    md = s.maildir("fred@a.test")
    line = b"." + b"y" * 97 + b"\r\n"
    msg = b"Subject: huge\r\n\r\n" + line * (50 * 1024 * 1024 // len(line))
    put(md, f"1700000000.Q1_0.host,S={len(msg)}", msg)
    assert s.proc is not None
    sock, f = raw_pop(s)
    sock.sendall(b"USER fred@a.test\r\nPASS pw\r\nTOP 1 1\r\n")
    f.readline()  # type: ignore[attr-defined]
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    assert [f.readline() for _ in range(4)][-2:] == [b"." + line, b".\r\n"]  # type: ignore[attr-defined]
    before = peak = _rss_kib(s.proc.pid)  # after the login (argon2 needs its memory)
    t0 = time.perf_counter()
    sock.sendall(b"RETR 1\r\n")
    assert f.readline() == f"+OK {len(msg)} octets\r\n".encode()  # type: ignore[attr-defined]
    digest = hashlib.sha256()
    n = 0
    while (got := f.readline()) != b".\r\n":  # type: ignore[attr-defined]
        digest.update(got[1:] if got.startswith(b".") else got)
        n += 1
        if n % 20_000 == 0:
            peak = max(peak, _rss_kib(s.proc.pid))
    elapsed = time.perf_counter() - t0
    sock.sendall(b"QUIT\r\n")
    sock.close()
    assert digest.digest() == hashlib.sha256(msg).digest()
    grown = peak - before
    print(f"\n50 MB RETR: {elapsed:.2f} s, server RSS grew by at most {grown / 1024:.1f} MiB")
    assert grown < 25 * 1024


def retr_of_16_mb(s: Server, user: str) -> tuple[ssl.SSLSocket, Any, bytes]:
    """A 16 MB message in ``user``'s new mailbox, its login and RETR sent over POP3S, the
    login's answers read: the socket, its reader (at the RETR's +OK) and the message."""
    s.add_user(user, "pw")
    msg = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 200_000
    put(s.maildir(user), f"1700000000.Q1_0.h,S={len(msg)}", msg)
    sock, f = raw_pop(s)
    sock.sendall(f"USER {user}\r\nPASS pw\r\nRETR 1\r\n".encode())
    f.readline()  # type: ignore[attr-defined]
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    return sock, f, msg


def test_client_stalled_in_retr_is_dropped_and_unlocks(server_factory: ServerFactory) -> None:
    s = server_factory(services=("pop3s",), extra_toml='[limits]\npop3_idle_timeout = "1s"')
    sock, _f, _msg = retr_of_16_mb(s, "gina@a.test")
    # Not reading: the server's writes stall, then it gives up and releases the mailbox.
    pop = login_when_free(s, "gina@a.test", timeout=20)
    assert pop.stat()[0] == 1
    pop.quit()
    # It reset the connection: no socket is left in the kernel with the unread answer.
    assert fin_wait_1(s.ports["pop3s"]) == 0
    sock.close()


def fin_wait_1(port: int) -> int:
    """Sockets of local ``port`` closed with unsent data (FIN-WAIT-1, state 04 in /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                count += int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "04"
    return count


def test_auth_scram_sha_256(srv: Server) -> None:
    """SCRAM-SHA-256 over POP3 AUTH (RFC 5034 §4: server-final as a "+" challenge)."""
    sock, f = raw_pop(srv)
    cnonce = secrets.token_hex(8)
    first_bare = f"n=alice@a.test,r={cnonce}"
    sock.sendall(b"AUTH SCRAM-SHA-256 " + base64.b64encode(b"n,," + first_bare.encode()) + b"\r\n")
    line = f.readline()  # type: ignore[attr-defined]
    assert line.startswith(b"+ ")
    server_first = base64.b64decode(line[2:].strip()).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    final_wo = f"c=biws,r={attrs['r']}"
    auth_msg = f"{first_bare},{server_first},{final_wo}".encode()
    sig = hmac.new(hashlib.sha256(client_key).digest(), auth_msg, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig, strict=True)))
    sock.sendall(base64.b64encode(f"{final_wo},p=".encode() + proof) + b"\r\n")
    line = f.readline()  # type: ignore[attr-defined]
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expect = base64.b64encode(hmac.new(server_key, auth_msg, "sha256").digest())
    assert base64.b64decode(line[2:].strip()) == b"v=" + expect
    sock.sendall(b"\r\nSTAT\r\n")
    assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    assert f.readline().split()[:2] == [b"+OK", b"3"]  # type: ignore[attr-defined]
    sock.close()


def test_pipelined_retrs_are_answered_as_the_client_reads(server_factory: ServerFactory) -> None:
    """300 pipelined RETRs of a 200 KiB message (60 MB of answers) sent in one write: the
    server holds back while the client does not read, instead of buffering every answer."""
    s = server_factory(services=("pop3s",))
    s.add_user("hal@a.test", "pw")
    msg = b"Subject: p\r\n\r\n" + (b"p" * 98 + b"\r\n") * 2000
    put(s.maildir("hal@a.test"), f"1700000000.Q1_0.h,S={len(msg)}", msg)
    assert s.proc is not None
    sock, f = raw_pop(s)
    sock.sendall(b"USER hal@a.test\r\nPASS pw\r\nNOOP\r\n")
    for _ in range(3):
        assert f.readline().startswith(b"+OK")  # type: ignore[attr-defined]
    before = _rss_kib(s.proc.pid)
    sock.sendall(b"RETR 1\r\n" * 300)
    time.sleep(1.5)
    grown = _rss_kib(s.proc.pid) - before
    answers = 0
    while answers < 300:
        line = f.readline()  # type: ignore[attr-defined]
        if line == b".\r\n":
            answers += 1
    sock.close()
    print(f"\n300 pipelined RETRs unread: server RSS grew by {grown / 1024:.1f} MiB")
    assert grown < 25 * 1024


def test_a_stop_during_a_large_retr_exits_once_the_client_has_read_it(
    server_factory: ServerFactory,
) -> None:
    """A probe: SIGTERM while a 16 MB RETR waited on the client; the client then read it all
    and the -ERR in a moment, yet the server exited only at its 8 s deadline (the closing
    connection looked at what was left to read once every 10 s)."""
    s = server_factory(services=("pop3s",))
    sock, f, msg = retr_of_16_mb(s, "hana@a.test")
    assert f.readline() == f"+OK {len(msg)} octets\r\n".encode()  # type: ignore[attr-defined]
    time.sleep(0.3)  # the server's writes stall on the client
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    got = 0
    while (line := f.readline()) not in (b".\r\n", b""):  # type: ignore[attr-defined]
        got += len(line)
    assert got == len(msg)
    assert f.readline().startswith(b"-ERR [SYS/TEMP]")  # type: ignore[attr-defined]
    assert s.proc.wait(10) == 0
    assert time.monotonic() - started < 3.0
    s.proc = None
    sock.close()
