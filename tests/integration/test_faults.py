"""Issue 6 faults: a full disk, a corrupt queue file, dropping root."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.conftest import Server, ServerFactory, free_port, run_cli, wait_until


@pytest.fixture
def small_disk() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = Path(tempfile.mkdtemp(prefix="postroom-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def start_on(data_dir: Path, tmp_path: Path, extra: str = "") -> Server:
    port = free_port()
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{data_dir}"\n'
        f'{extra}\n[listen]\nsmtp = ["127.0.0.1:{port}"]\n'
    )
    srv = Server(cfg, data_dir, "127.0.0.1", {"smtp": port}, ["a.test"], log=tmp_path / "log")
    for user in ("alice@a.test", "bob@a.test"):
        run_cli("user", "add", user, "--password-stdin", "--allow-short", config=cfg, stdin="pw\n")
    srv.start()
    return srv


def fill(path: Path) -> None:
    """Write to ``path`` until the file system is full."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_disk_full_gives_452_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    srv = start_on(small_disk / "data", tmp_path)
    try:
        filler = small_disk / "filler"
        fill(filler)
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.ehlo()
            c.mail("x@r.test")
            c.rcpt("alice@a.test")
            code, text = c.data(b"Subject: full\r\n\r\n" + b"z" * 200_000 + b"\r\n")
            assert (code, text[:5]) == (452, b"4.3.1")
            # A large message goes to its body file as it comes: its write fails mid-DATA,
            # and the client still gets its 452 after the data.
            c.mail("x@r.test")
            c.rcpt("alice@a.test")
            code, text = c.data(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500)
            assert (code, text[:5]) == (452, b"4.3.1")
            assert c.noop()[0] == 250
        assert srv.messages("alice@a.test") == []
        bodies = srv.data_dir / "journal" / "bodies"
        assert [p.stat().st_size for p in bodies.iterdir()] == [0] * len(os.listdir(bodies))
        # (nothing half-kept: what is there is empty files made ahead)
        # Room for one copy, not for two: the copies are links to one file, so both fit.
        size = filler.stat().st_size
        os.truncate(filler, size - 1_500_000)
        body = b"Subject: half\r\n\r\n" + b"h" * 250_000 + b"\r\n"
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.ehlo()
            c.mail("x@r.test")
            c.rcpt("alice@a.test")
            c.rcpt("bob@a.test")
            assert c.data(body)[0] == 250
        (one,) = srv.files("alice@a.test")
        (two,) = srv.files("bob@a.test")
        assert one.stat().st_ino == two.stat().st_ino
        filler.unlink()
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.sendmail("x@r.test", ["alice@a.test"], b"Subject: room\r\n\r\nok\r\n")
        msgs = srv.wait_messages("alice@a.test", 2)
        assert len(msgs) == 2 and any(b"Subject: room" in m for m in msgs)
        assert not list((srv.data_dir / "mail/a.test/alice/tmp").iterdir())
    finally:
        srv.stop()


def test_mail_a_restart_on_a_full_disk_kept_is_delivered_once_at_the_next(
    small_disk: Path, tmp_path: Path
) -> None:
    """Mail that got its 250 on a full disk (in the journal's reserved room), and a restart
    while the disk is still full: the start's replay cannot park it and keeps its segment
    (marking what it did); once there is room, ``queue flush`` (a probe: it did nothing, and
    a second restart was needed) or the next start delivers each message once."""
    srv = start_on(small_disk / "data", tmp_path)
    try:
        filler = small_disk / "filler"
        fill(filler)
        accepted = []
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.ehlo()
            for i in range(5):
                c.mail("x@r.test")
                c.rcpt("bob@a.test")
                if c.data(f"Subject: kept {i}\r\n\r\nbody\r\n".encode())[0] == 250:
                    accepted.append(f"Subject: kept {i}".encode())
        assert accepted  # (they fit in the room the journal reserves)
        srv.stop()
        srv.start()  # still full: the replay keeps the segment
        assert ".journal: kept for the next start" in srv.log.read_text()
        filler.unlink()
        srv.cli("queue", "flush")
        msgs = srv.wait_messages("bob@a.test", len(accepted), timeout=15)
        for subject in accepted:
            assert sum(subject in m for m in msgs) == 1, subject
        assert len(msgs) == len(accepted)
        srv.stop()
        srv.start()  # and the next start makes none of them again
        time.sleep(1)
        assert len(srv.messages("bob@a.test")) == len(accepted)
    finally:
        srv.stop()


def test_unwritable_mailbox_defers_logs_and_delivers_once_mended(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml='[delivery]\nretry_intervals = ["1s"]',
    )
    srv.add_user("alice@a.test")
    box = srv.data_dir / "mail" / "a.test" / "alice"
    if box.exists():
        shutil.rmtree(box)
    box.parent.mkdir(parents=True, exist_ok=True)
    box.write_bytes(b"")  # a plain file where the Maildir should be: every write fails
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: later\r\n\r\nok\r\n")  # spooled
    log = srv.log.read_text
    wait_until(
        lambda: "to=<alice@a.test>, relay=local, delay=" in log() and "status=deferred" in log()
    )
    box.unlink()  # mended: the next attempt delivers it, once
    msgs = srv.wait_messages("alice@a.test", 1)
    assert len(msgs) == 1 and b"Subject: later" in msgs[0]
    time.sleep(1.5)  # a further retry would have come by now
    assert len(srv.messages("alice@a.test")) == 1


def test_corrupt_queue_file_is_moved_aside(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test",), services=("smtp",), start=False)
    srv.add_user("alice@a.test")
    qdir = srv.data_dir / "queue" / "msg"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "0BADBADBADBAD").write_bytes(b"this is not a queue file")
    srv.start()
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: fine\r\n\r\nok\r\n")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
    assert (srv.data_dir / "queue" / "corrupt" / "0BADBADBADBAD").exists()
    assert not (qdir / "0BADBADBADBAD").exists()
    assert "corrupt queue file" in srv.log.read_text()


def test_sighup_adds_a_local_domain_to_the_queue_too(server_factory: ServerFactory) -> None:
    # The queue runner kept the configuration it started with: after a SIGHUP that added a
    # domain, RCPT accepted mail for it and the runner then looked up its MX as a remote one.
    srv = server_factory(domains=("a.test",), services=("smtp",))
    text = srv.config.read_text()
    srv.config.write_text(text.replace('domains = ["a.test"]', 'domains = ["a.test", "b.test"]'))
    srv.add_user("carol@b.test")
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in srv.log.read_text())
    # Over 1 MiB: through the spool and the queue runner, not the direct Maildir write.
    body = b"Subject: new domain\r\n\r\n" + b"x" * 1000 + b"\r\n"
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("x@r.test", ["carol@b.test"], body * 1100)
    assert len(srv.wait_messages("carol@b.test", 1)) == 1
    # Its DKIM keys are made by the reload, as a domain's are on first start.
    assert (srv.data_dir / "dkim" / "b.test" / "keys.json").is_file()


def test_sighup_applies_new_connection_limits(server_factory: ServerFactory) -> None:
    # The limiter kept the numbers it was built with although the log said "reloaded".
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml="[limits]\nmax_connections_per_ip = 2\nper_ip_exempt = []",
    )

    def greetings(n: int) -> list[bytes]:
        socks = [
            socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) for _ in range(n)
        ]
        try:
            return [s.recv(100)[:3] for s in socks]
        finally:
            for s in socks:
                s.close()

    assert greetings(3) == [b"220", b"220", b"421"]
    text = srv.config.read_text().replace(
        "max_connections_per_ip = 2", "max_connections_per_ip = 5"
    )
    srv.config.write_text(text)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in srv.log.read_text())
    # The two refused above may not be closed on the server's side yet: wait until they are.
    wait_until(lambda: greetings(3) == [b"220", b"220", b"220"])


def test_reload_changes_the_log_format_of_every_process(server_factory: ServerFactory) -> None:
    srv = server_factory(extra_toml='log_format = "json"\n')
    wait_until(lambda: '"event"' in srv.log.read_text())
    srv.config.write_text(srv.config.read_text().replace('log_format = "json"', ""))
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "sent to the workers" in srv.log.read_text())
    line = next(x for x in srv.log.read_text().splitlines() if "sent to the workers" in x)
    assert not line.startswith("{") and "postroom[" in line  # the supervisor's, in text


def test_drops_root_to_configured_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    base = Path(tempfile.mkdtemp(prefix="postroom-priv-"))
    os.chmod(base, 0o755)
    # Parents that do not exist yet (made by root, they must let the user through), and two
    # workers (each makes its control socket as root, before the drop).
    srv = start_on(base / "new" / "data", tmp_path, extra='user = "nobody"\nworkers = 2')
    try:
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.sendmail("x@r.test", ["alice@a.test"], b"Subject: priv\r\n\r\nok\r\n")
        assert len(srv.wait_messages("alice@a.test", 1)) == 1
        assert srv.proc is not None
        # (The second worker starts once the first has recovered the queue: ready by now?)
        wait_until(lambda: "worker 1 ready" in srv.log.read_text())
        # Every process that serves clients (the workers under the supervisor, and their
        # Maildir writers) runs as the user; only the supervisor keeps root, to re-read a
        # root-only TLS key at SIGHUP and to start a worker again.
        children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text()
        workers = [int(p) for p in children.split()]
        assert workers
        for pid in workers + [
            int(p)
            for w in workers
            for p in Path(f"/proc/{w}/task/{w}/children").read_text().split()
        ]:
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == ["65534"] * 4, pid
        delivered = next((srv.maildir("alice@a.test") / "new").iterdir())
        assert delivered.stat().st_uid == 65534
        # The CLI, run as root, leaves files the server can still use.
        run_cli(
            "user",
            "add",
            "carol@a.test",
            "--password-stdin",
            "--allow-short",
            config=srv.config,
            stdin="x\n",
        )
        time.sleep(0.2)
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.sendmail("x@r.test", ["carol@a.test"], b"Subject: priv2\r\n\r\nok\r\n")
        assert len(srv.wait_messages("carol@a.test", 1)) == 1
        # Everything under data_dir is the user's: the control sockets of both workers, and
        # the self-signed pair the supervisor (root) makes again for a new hostname at a
        # SIGHUP, which a worker passes on (it may not signal the supervisor: a message).
        assert {p.stat().st_uid for p in srv.data_dir.glob("control*.sock")} == {65534}
        assert len(list(srv.data_dir.glob("control*.sock"))) == 2
        srv.config.write_text(srv.config.read_text().replace("mx.a.test", "mx2.a.test"))
        os.kill(workers[-1], signal.SIGHUP)
        wait_until(lambda: "sent to the workers" in srv.log.read_text())
        assert {p.stat().st_uid for p in (srv.data_dir / "tls").iterdir()} == {65534}
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_a_reload_serves_a_new_pair_of_another_key_type(server_factory: ServerFactory) -> None:
    # Started on the self-signed EC pair, reloaded with an RSA one: the RSA pair went into the
    # live context beside the EC one, and every client that takes EC still got the old one.
    srv = server_factory(domains=("a.test",), services=("smtp", "submissions"))
    pair = srv.config.parent / "rsa"
    pair.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=renewed.a.test", "-keyout", str(pair / "key.pem"), "-out", str(pair / "cert.pem")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    text = srv.config.read_text() + f'\n[tls]\ncert = "{pair}/cert.pem"\nkey = "{pair}/key.pem"\n'
    srv.config.write_text(text)

    def served_name() -> str:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with (
            socket.create_connection((srv.host, srv.ports["submissions"]), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    assert served_name() == "mx.a.test"
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded with the TLS pair" in srv.log.read_text())
    assert served_name() == "renewed.a.test"
