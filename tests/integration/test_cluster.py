"""Several nodes on one PostgreSQL: shared accounts, mailboxes, queue and DKIM keys, the CLI
from any node, ``db`` commands. (Crashes and restarts: ``test_cluster_crash.py``.)

Each node is its own ``postroom serve`` on its own loopback address with its own data_dir.
"""

from __future__ import annotations

import asyncio
import poplib
import smtplib
import time
from pathlib import Path

import asyncpg
import pytest

from postroom.storage.local.accounts import Accounts
from tests.conftest import Server, ServerFactory, insecure, run_cli
from tests.pgserver import PgServer

SERVICES = ("smtp", "submission", "pop3")


def storage_toml(url: str) -> str:
    return f'[storage]\nbackend = "postgresql"\nurl = "{url}"\n'


@pytest.fixture
def nodes(server_factory: ServerFactory, pg_url: str) -> tuple[Server, Server]:
    a = server_factory(host="127.0.0.2", extra_toml=storage_toml(pg_url), services=SERVICES)
    b = server_factory(host="127.0.0.3", extra_toml=storage_toml(pg_url), services=SERVICES)
    return a, b


def login_ok(node: Server, user: str, password: str) -> bool:
    with smtplib.SMTP(node.host, node.ports["submission"], timeout=10) as c:
        c.starttls(context=insecure())
        try:
            c.login(user, password)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


def rcpt_code(node: Server, rcpt: str) -> int:
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=10) as c:
        c.ehlo("client.test")
        c.mail("someone@remote.test")
        return c.rcpt(rcpt)[0]


def pop_login(node: Server, user: str, password: str) -> poplib.POP3:
    pop = poplib.POP3(node.host, node.ports["pop3"], timeout=20)
    pop.stls(context=insecure())
    pop.user(user)
    pop.pass_(password)
    return pop


def retrieve_all(node: Server, user: str, password: str, delete: bool = False) -> list[bytes]:
    """Every message of the maildrop as RETR gives it (CRLF, dot-unstuffed by poplib)."""
    pop = pop_login(node, user, password)
    try:
        count = len(pop.list()[1])
        out = []
        for n in range(1, count + 1):
            out.append(b"\r\n".join(pop.retr(n)[1]) + b"\r\n")
            if delete:
                pop.dele(n)
    finally:
        pop.quit()
    return out


def within(seconds: float, check) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_user_added_on_node_a_logs_in_on_node_b(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    assert not login_ok(b, "ann@a.test", "pw-one")
    a.add_user("ann@a.test", "pw-one")
    assert within(1.0, lambda: login_ok(b, "Ann@a.test", "pw-one"))
    b.cli("user", "passwd", "ann@a.test", "--password-stdin", stdin="pw-two\n")
    assert within(1.0, lambda: login_ok(a, "ann@a.test", "pw-two"))
    assert not login_ok(a, "ann@a.test", "pw-one")
    assert b.cli("user", "list").stdout.split() == ["ann@a.test"]
    assert (
        a.cli("user", "add", "ann@a.test", "--password-stdin", stdin="x\n", check=False).returncode
        == 1
    )


def test_aliases_and_user_del_from_any_node(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    a.add_user("ann@a.test")
    assert rcpt_code(b, "sales@a.test") == 550
    b.cli("alias", "add", "sales@a.test", "ann@a.test")
    assert within(1.0, lambda: rcpt_code(a, "sales@a.test") == 250)
    missing = a.cli("alias", "add", "team@a.test", "nobody@a.test", check=False)
    assert missing.returncode == 1 and "nobody@a.test" in missing.stderr
    gone = a.cli("user", "del", "ann@a.test")
    assert "sales@a.test" in gone.stdout
    assert within(1.0, lambda: rcpt_code(b, "sales@a.test") == 550)
    assert b.cli("alias", "list").stdout == ""


def _config(tmp_path: Path, url: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'domains = ["a.test"]\ndata_dir = "{tmp_path / "data"}"\n' + storage_toml(url))
    return cfg


def test_db_check_and_migrate(tmp_path: Path, pg_url: str) -> None:
    cfg = _config(tmp_path, pg_url)
    fresh = run_cli("db", "check", config=cfg, check=False)
    assert fresh.returncode == 1
    assert "connection: ok" in fresh.stdout and "schema version: 0" in fresh.stdout
    assert "pending: 1: accounts and aliases" in fresh.stdout
    migrated = run_cli("db", "migrate", config=cfg)
    assert "applied 1: accounts and aliases" in migrated.stdout
    ok = run_cli("db", "check", config=cfg)
    assert "pending: none" in ok.stdout
    assert "up to date" in run_cli("db", "migrate", config=cfg).stdout


def test_queue_and_dns_commands_on_a_database_no_node_has_used_yet(
    tmp_path: Path, pg_server: PgServer
) -> None:
    # Each command is the first to touch a fresh database, as `user add` may be: it applies
    # the schema rather than failing (with a traceback) on a table that is not there yet.
    listed = run_cli("queue", "list", config=_config(tmp_path / "a", pg_server.new_database()))
    assert listed.stdout == "" and "Traceback" not in listed.stderr
    as_json = run_cli(
        "queue", "list", "--json", config=_config(tmp_path / "b", pg_server.new_database())
    )
    assert as_json.stdout.strip() == "[]"
    unknown = run_cli(
        "queue",
        "show",
        "0661A7A739A332005A7371FCD13D0000",
        config=_config(tmp_path / "c", pg_server.new_database()),
        check=False,
    )
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    # The DKIM keys are made once, by the first command that needs them; every node then
    # prints the same records.
    url = pg_server.new_database()
    first = run_cli("dns", "a.test", config=_config(tmp_path / "d", url))
    assert "._domainkey.a.test." in first.stdout
    assert run_cli("dns", "a.test", config=_config(tmp_path / "e", url)).stdout == first.stdout


def test_db_check_unreachable_and_db_on_local_backend(tmp_path: Path) -> None:
    away = run_cli(
        "db", "check", config=_config(tmp_path, "postgresql://u@127.0.0.1:1/db"), check=False
    )
    assert away.returncode == 1 and "connection: failed" in away.stdout
    local = tmp_path / "local.toml"
    local.write_text('domains = ["a.test"]\n')
    wrong = run_cli("db", "check", config=local, check=False)
    assert wrong.returncode == 2 and "storage.backend" in wrong.stderr


def test_serve_without_postgresql_exits_1_in_one_line(
    server_factory: ServerFactory,
) -> None:
    node = server_factory(
        extra_toml=storage_toml("postgresql://u@127.0.0.1:1/db"), services=SERVICES, start=False
    )
    p = run_cli("serve", config=node.config, check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "PostgreSQL" in p.stderr


def test_a_database_or_role_that_does_not_exist_is_one_line(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """PostgreSQL's own refusals at connect time, like its absence: exit 1, one line."""
    bad_role = pg_server.url("postgres").replace("postgres@", "nosuchrole@", 1)
    for n, url in enumerate((pg_server.url("nosuchdb"), bad_role)):
        cfg = _config(tmp_path / str(n), url)
        for argv in (("user", "list"), ("serve",)):
            p = run_cli(*argv, config=cfg, check=False)
            assert p.returncode == 1, (argv, p.stderr)
            assert "Traceback" not in p.stderr and "cannot connect to PostgreSQL" in p.stderr
    broken = _config(tmp_path / "v6", "postgresql://u@[::1:5432/db")
    p = run_cli("user", "list", config=broken, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "storage.url" in p.stderr


def test_import_a_local_node(server_factory: ServerFactory, tmp_path: Path, pg_url: str) -> None:
    single = server_factory(services=SERVICES)
    single.add_user("ann@a.test", "ann-pw")
    single.cli("alias", "add", "sales@a.test", "ann@a.test")
    with smtplib.SMTP(single.host, single.ports["smtp"], timeout=10) as c:
        c.sendmail("s@remote.test", ["sales@a.test"], b"Subject: one\r\n\r\nbody\r\n")
    assert len(single.wait_messages("ann@a.test", 1)) == 1
    published = [
        line for line in single.cli("dns", "a.test").stdout.splitlines() if "DKIM1" in line
    ]
    single.stop()
    # Made by the node at its first SCRAM login; the cluster must go on with it (recheck
    # probe: unknown users got new made-up salts, real ones kept theirs).
    decoy = Accounts(single.data_dir).decoy_secret
    cfg = _config(tmp_path, pg_url)
    out = run_cli("db", "import", str(single.data_dir), config=cfg).stdout
    assert "users: 1 added" in out and "messages: 1 added" in out
    assert "alias targets: 1 added (0 there already)" in out
    assert "dkim keys of a.test: 2 added" in out
    again = run_cli("db", "import", str(single.data_dir), config=cfg).stdout
    assert "users: 0 added" in again and "messages: 0 added (1 there already)" in again
    assert "alias targets: 0 added (1 there already)" in again
    assert "dkim keys of a.test: the database has its own, kept" in again

    async def cluster_decoy() -> bytes:
        conn = await asyncpg.connect(pg_url)
        try:
            return bytes(await conn.fetchval("SELECT value FROM secrets WHERE name='scram-decoy'"))
        finally:
            await conn.close()

    assert asyncio.run(cluster_decoy()) == decoy
    node = server_factory(extra_toml=storage_toml(pg_url), services=SERVICES, host="127.0.0.4")
    assert login_ok(node, "ann@a.test", "ann-pw")  # the same hash, the same password
    assert rcpt_code(node, "sales@a.test") == 250
    # The records published for the single node still name the keys that sign.
    assert [
        line for line in node.cli("dns", "a.test").stdout.splitlines() if "DKIM1" in line
    ] == published


MESSAGE = (
    b"From: s@remote.test\r\nTo: ann@a.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"caf\xc3\xa9 line\r\n.leading dot\r\n..two dots\r\n\r\n" + b"x" * 990 + b"\r\nlast\r\n"
)


def test_mail_through_a_is_fetched_byte_exact_through_b(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    a.add_user("ann@a.test", "ann-pw")
    with smtplib.SMTP(a.host, a.ports["smtp"], timeout=10) as c:
        c.sendmail("s@remote.test", ["ann@a.test"], MESSAGE)
    via_b = retrieve_all(b, "ann@a.test", "ann-pw")
    assert len(via_b) == 1
    # Our headers first (Return-Path, Received by A, ...), then the client's octets as sent.
    assert via_b[0].startswith(b"Return-Path: <s@remote.test>\r\n")
    assert via_b[0].endswith(b"\r\n" + MESSAGE)
    assert b"\r\nReceived: from " in via_b[0] and b"by mx.a.test" in via_b[0]
    assert retrieve_all(a, "ann@a.test", "ann-pw", delete=True) == via_b  # the same octets
    assert retrieve_all(b, "ann@a.test", "ann-pw") == []  # deleted at A's QUIT
    assert not (a.data_dir / "mail").exists()  # nothing of it on a node's disk


def test_in_use_holds_across_nodes(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    a.add_user("ann@a.test", "ann-pw")
    first = pop_login(a, "ann@a.test", "ann-pw")
    try:
        second = poplib.POP3(b.host, b.ports["pop3"], timeout=20)
        second.stls(context=insecure())
        second.user("ann@a.test")
        try:
            second.pass_("ann-pw")
            raise AssertionError("a second session on another node got the maildrop")
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]
        finally:
            second.close()
    finally:
        first.quit()
    pop_login(b, "ann@a.test", "ann-pw").quit()  # free again once the first has quit


def test_queue_and_dkim_keys_are_shared(server_factory: ServerFactory, pg_url: str) -> None:
    from tests.dnszone import LoopbackDNS

    dns = LoopbackDNS()
    dns.mx("remote.test", 10, "mx.remote.test")
    dns.a("mx.remote.test", "127.0.0.9")  # nobody listens there: deferred
    extra = storage_toml(pg_url) + f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
    try:
        a = server_factory(host="127.0.0.2", extra_toml=extra, services=SERVICES)
        b = server_factory(host="127.0.0.3", extra_toml=extra, services=SERVICES)
        # Both nodes list the same DKIM records (made once, by whichever node came first).
        assert a.cli("dns", "a.test").stdout == b.cli("dns", "a.test").stdout
        assert "_domainkey.a.test." in a.cli("dns", "a.test").stdout
        a.cli("alias", "add", "fwd@a.test", "r@remote.test")
        with smtplib.SMTP(a.host, a.ports["smtp"], timeout=10) as c:
            c.sendmail("s@remote.test", ["fwd@a.test"], b"Subject: q\r\n\r\nq\r\n")
        assert within(10, lambda: "deferred" in b.cli("queue", "list", "--json").stdout)
        queue_id = b.cli("queue", "list").stdout.split("\t")[0]
        assert f"id: {queue_id}" in a.cli("queue", "show", queue_id).stdout
        assert "1 deferred message(s) due now" in b.cli("queue", "flush").stderr
        a.cli("queue", "delete", queue_id)
        assert b.cli("queue", "list").stdout == ""
        assert a.cli("queue", "delete", queue_id, check=False).returncode == 1
        # Each node logs what the admin did, as a single node does (via NOTIFY here).
        for node in (a, b):
            assert within(
                10, lambda n=node: f"{queue_id}: removed (queue delete)" in n.log.read_text()
            )
            assert "queue flush: 1 deferred messages due now" in node.log.read_text()
    finally:
        dns.stop()


def test_two_workers_on_postgresql(server_factory: ServerFactory, pg_url: str) -> None:
    node = server_factory(extra_toml="workers = 2\n" + storage_toml(pg_url), services=SERVICES)
    node.add_user("ann@a.test", "ann-pw")
    for i in range(12):  # the kernel spreads the connections over both workers
        with smtplib.SMTP(node.host, node.ports["smtp"], timeout=10) as c:
            c.sendmail("s@remote.test", ["ann@a.test"], f"Subject: {i}\r\n\r\n{i}\r\n".encode())
    subjects = sorted(
        m.split(b"Subject: ")[1].split(b"\r\n")[0]
        for m in retrieve_all(node, "ann@a.test", "ann-pw")
    )
    assert subjects == sorted(str(i).encode() for i in range(12))


def test_a_bounce_on_postgresql_reaches_the_sender_once(
    server_factory: ServerFactory, pg_url: str
) -> None:
    """The DSN path on the shared queue: the outcome and the DSN it owes are stored, the DSN
    is queued held, then started once the outcome is recorded (``QueueRunner._deliver``)."""
    from tests.dnszone import LoopbackDNS

    dns = LoopbackDNS()  # no zone for nowhere.test: NXDOMAIN, an immediate 5.1.2 bounce
    extra = storage_toml(pg_url) + f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
    try:
        a = server_factory(host="127.0.0.2", extra_toml=extra, services=SERVICES)
        b = server_factory(host="127.0.0.3", extra_toml=extra, services=SERVICES)
        a.add_user("ann@a.test", "ann-pw")
        with smtplib.SMTP(a.host, a.ports["submission"], timeout=10) as c:
            c.starttls(context=insecure())
            c.login("ann@a.test", "ann-pw")
            c.sendmail("ann@a.test", ["x@nowhere.test"], b"Subject: doomed\r\n\r\nq\r\n")
        # The DSN is queued before its message leaves the queue: empty, it was delivered.
        assert within(10, lambda: a.cli("queue", "list").stdout == "")
        (report,) = retrieve_all(b, "ann@a.test", "ann-pw")
        assert report.startswith(b"Return-Path: <>\r\n") and b"multipart/report" in report
        assert b"Final-Recipient: rfc822; x@nowhere.test" in report
        assert b"Status: 5.1.2" in report
    finally:
        dns.stop()
