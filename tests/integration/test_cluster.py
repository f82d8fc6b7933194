"""Several nodes on one PostgreSQL: shared accounts, the CLI from any node, ``db`` commands.

Each node is its own ``postroom serve`` on its own loopback address with its own data_dir.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory, insecure, run_cli

SERVICES = ("smtp", "submission")


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


def test_import_a_local_node(server_factory: ServerFactory, tmp_path: Path, pg_url: str) -> None:
    single = server_factory(services=SERVICES)
    single.add_user("ann@a.test", "ann-pw")
    single.cli("alias", "add", "sales@a.test", "ann@a.test")
    with smtplib.SMTP(single.host, single.ports["smtp"], timeout=10) as c:
        c.sendmail("s@remote.test", ["sales@a.test"], b"Subject: one\r\n\r\nbody\r\n")
    assert len(single.wait_messages("ann@a.test", 1)) == 1
    single.stop()
    cfg = _config(tmp_path, pg_url)
    out = run_cli("db", "import", str(single.data_dir), config=cfg).stdout
    assert "users: 1 added" in out and "messages: 1 added" in out
    again = run_cli("db", "import", str(single.data_dir), config=cfg).stdout
    assert "users: 0 added" in again and "messages: 0 added (1 there already)" in again
    node = server_factory(extra_toml=storage_toml(pg_url), services=SERVICES, host="127.0.0.4")
    assert login_ok(node, "ann@a.test", "ann-pw")  # the same hash, the same password
    assert rcpt_code(node, "sales@a.test") == 250
