"""The documented CLI: exit codes, -c before or after the subcommand, user/alias/queue."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import env_with_src, free_port, run_cli


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test", "Bücher.test"]\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    return path


def test_user_lifecycle(cfg: Path) -> None:
    assert (
        run_cli(
            "user",
            "add",
            "Alice@A.test",
            "--password-stdin",
            "--allow-short",
            config=cfg,
            stdin="pw\r\n",
        ).returncode
        == 0
    )
    assert (cfg.parent / "data" / "mail" / "a.test" / "alice" / "new").is_dir()
    # -c after the subcommand, or before it
    p = run_cli("-c", str(cfg), "user", "list")
    assert p.stdout.split() == ["alice@a.test"]
    dup = run_cli(
        "user",
        "add",
        "alice@a.test",
        "--password-stdin",
        "--allow-short",
        config=cfg,
        stdin="x\n",
        check=False,
    )
    assert dup.returncode == 1
    for bad in ("not-an-address", "bob@other.test", "../x@a.test"):
        p = run_cli(
            "user",
            "add",
            bad,
            "--password-stdin",
            "--allow-short",
            config=cfg,
            stdin="x\n",
            check=False,
        )
        assert p.returncode == 1, bad
    run_cli(
        "user",
        "passwd",
        "alice@a.test",
        "--password-stdin",
        "--allow-short",
        config=cfg,
        stdin="new\n",
    )
    assert (
        run_cli(
            "user",
            "passwd",
            "nobody@a.test",
            "--password-stdin",
            "--allow-short",
            config=cfg,
            stdin="x\n",
            check=False,
        ).returncode
        == 1
    )
    run_cli(
        "user",
        "add",
        "jürgen@bücher.test",
        "--password-stdin",
        "--allow-short",
        config=cfg,
        stdin="x\n",
    )
    assert "jürgen@xn--bcher-kva.test" in run_cli("user", "list", config=cfg).stdout
    run_cli("user", "del", "alice@a.test", config=cfg)
    assert "alice" not in run_cli("user", "list", config=cfg).stdout
    assert run_cli("user", "del", "alice@a.test", config=cfg, check=False).returncode == 1


def test_aliases(cfg: Path) -> None:
    run_cli("user", "add", "a@a.test", "--password-stdin", "--allow-short", config=cfg, stdin="x\n")
    run_cli("alias", "add", "team@a.test", "a@a.test", "b@remote.test", config=cfg)
    out = run_cli("alias", "list", config=cfg).stdout
    assert out.strip() == "team@a.test\ta@a.test b@remote.test"
    run_cli("alias", "add", "all@a.test", "team@a.test", config=cfg)
    out = run_cli("alias", "del", "team@a.test", config=cfg).stdout
    assert out.splitlines() == ["removed team@a.test from alias all@a.test"]
    assert run_cli("alias", "list", config=cfg).stdout == ""  # all@ was left with no target
    assert run_cli("alias", "del", "team@a.test", config=cfg, check=False).returncode == 1
    # A remote target may be any UTF-8 address: alias list printed a right-to-left override
    # or a zero-width space as it was, for the terminal to act on (recheck2 probe).
    run_cli("alias", "add", "far@a.test", "x\u202eab\u200bc@remote.test", config=cfg)
    out = run_cli("alias", "list", config=cfg).stdout
    assert out == "far@a.test\tx?ab?c@remote.test\n"


def test_queue_commands_on_empty_queue(cfg: Path) -> None:
    assert run_cli("queue", "list", config=cfg).stdout == ""
    assert json.loads(run_cli("queue", "list", "--json", config=cfg).stdout) == []
    assert run_cli("queue", "show", "NOPE", config=cfg, check=False).returncode == 1
    assert run_cli("queue", "delete", "NOPE", config=cfg, check=False).returncode == 1
    for action in ("show", "delete"):  # the terminal's escapes in an id are "?" (cli probe)
        said = run_cli("queue", action, "\x1b]0;x\a\x1b[31mID", config=cfg, check=False)
        assert said.returncode == 1 and "?]0;x??[31mID" in said.stderr
    assert run_cli("queue", "flush", config=cfg).returncode == 0
    # An id is never a path: these named the account store and a file outside the data dir.
    victim = cfg.parent / "data" / "victim.txt"  # data_dir/queue/msg/../../victim.txt
    victim.write_text("keep me")
    for bad in ("../../victim.txt", "../../../data/victim.txt", "..", ""):
        assert run_cli("queue", "delete", bad, config=cfg, check=False).returncode == 1
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (("flush",), "did not flush the queue"),
        # (It said "no such message" of a message the server may have deleted as it died.)
        (("delete", "06620A6940763C003B7DFB21F4AF0000"), "did not delete"),
    ],
)
def test_a_queue_command_fails_when_the_server_reads_it_and_says_nothing(
    cfg: Path, command: tuple[str, ...], said: str
) -> None:
    """A server killed as it read ``flush`` left the CLI at exit 0, as if it had flushed (a
    kill -9 probe): a control socket that closes without an answer is an error."""
    run_cli("queue", "list", config=cfg)  # (makes the data dir)
    path = cfg.parent / "data" / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def read_and_close() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)

        reader = threading.Thread(target=read_and_close)
        reader.start()
        result = run_cli("queue", *command, config=cfg, check=False)
        reader.join(10)
    assert result.returncode == 1
    assert said in result.stderr and "no such message" not in result.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('hostname = "h"\ndomains = ["a.test"]\nbogus = 1\n', "bogus"),
        ('domains = ["a.test"]\n[limits]\nmessage_size = "lots"\n', "limits.message_size"),
        ('domains = ["a.test"]\n[listen]\nsmtp = ["nohostport"]\n', "listen.smtp"),
        ('domains = ["a.test"]\n[listen]\nsmtp = ["300.1.1.1:2525"]\n', "listen.smtp"),
        (
            'domains = ["a.test"]\n[delivery]\nretry_intervals = ["5x"]\n',
            "delivery.retry_intervals",
        ),
        ('domains = ["a.test"]\n[unknown]\nx = 1\n', "unknown"),
        ('domains = ["a.test"]\n[limits]\nmessage_size = "0MB"\n', "limits.message_size"),
        ('domains = ["a.test"]\n[dns]\nnameservers = ["dns..example"]\n', "dns.nameservers"),
        ('domains = ["a.test"]\n[dns]\nnameservers = ["999.1.1.1"]\n', "dns.nameservers"),
        (
            'domains = ["a.test"]\n[delivery]\nretry_intervals = ["99999999d"]\n',
            "delivery.retry_intervals",
        ),
        ('domains = ["a.test"]\n[delivery]\nmax_queue_time = inf\n', "delivery.max_queue_time"),
        ("domains = [\n", "invalid TOML"),
        ('domains = ["a.test"]\n[storage]\nbackend = "mysql"\n', "storage.backend"),
        # TOML 1.0: an integer 64 bits cannot hold is an error (tomllib takes it; cli probe)
        ('domains = ["a.test"]\n[limits]\nmax_recipients = 99999999999999999999\n', "limits.max_"),
        # A key's line end or escape was written as it is: two lines, and the terminal's
        ('domains = ["a.test"]\n[limits]\n"a\\nb\\u001b[31m" = 5\n', "limits.a?b?[31m: unknown"),
        ('domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n', "storage.url"),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\nurl = "http://x/db"\n',
            "storage.url",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\nurl = "postgresql://u@h:1"\n',
            "storage.url",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\nurl = "postgresql://h/db"\n',
            "storage.url",
        ),
        ('domains = ["a.test"]\n[storage]\nurl = "postgresql://u@h/db"\n', "storage.url"),
        (  # exit 1 at connect before (pg probe): asyncpg sent it on as a server setting
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n'
            'url = "postgresql://u@h/db?connect_timeout=5"\n',
            "storage.url: connect_timeout",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n'
            'url = "postgresql://u@h/db?sslmode=bogus"\n',
            "storage.url: sslmode",
        ),
        (  # (asyncpg's names are lower case only: this one went on as a setting, refused)
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n'
            'url = "postgresql://u@h/db?CONNECT_TIMEOUT=5"\n',
            "storage.url: CONNECT_TIMEOUT",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n'
            'url = "postgresql://u@h/db?target_session_attrs=bogus"\n',
            "storage.url: target_session_attrs",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\n'
            'url = "postgresql://u@h/db?ssl_min_protocol_version=TLSv9&sslkeylogfile=k"\n',
            "storage.url: ssl_min_protocol_version",
        ),
        (
            'domains = ["a.test"]\n[storage]\nbackend = "postgresql"\nurl = "postgresql://u@h/db?x"\n',
            "storage.url: bad query",
        ),
        ('domains = ["a.test"]\n[delivery]\nbind_address = "::1"\n', "delivery.bind_address"),
        ('domains = ["a.test"]\n[delivery]\nbind_address6 = "mx"\n', "delivery.bind_address6"),
        ('domains = ["a.test"]\n[tls]\ncert = "/etc/c.pem"\n', "tls.key: missing"),
        (  # no IPv6 connection leaves from it: every one failed (ipv6 probe)
            'domains = ["a.test"]\n[delivery]\nbind_address6 = "::ffff:127.0.0.1"\n',
            "delivery.bind_address6",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (("serve",), ("user", "list"), ("queue", "list")):
        p = run_cli(*args, config=path, check=False)
        assert p.returncode == 2
        line = p.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert line.startswith(f"postroom: error: {path}: ") and key in line


def test_bad_usage_exits_2(cfg: Path) -> None:
    assert run_cli("frobnicate", config=cfg, check=False).returncode == 2
    assert run_cli("user", config=cfg, check=False).returncode == 2
    assert run_cli("queue", "show", config=cfg, check=False).returncode == 2


def test_config_option_anywhere_around_the_subcommand(cfg: Path, tmp_path: Path) -> None:
    # "postroom user -c FILE list" silently used the embedded default (and made
    # ./postroom-data): the inner parser reset what the outer one had read.
    run_cli(
        "-c", str(cfg), "user", "add", "w@a.test", "--password-stdin", "--allow-short", stdin="x\n"
    )
    for args in (
        ("-c", str(cfg), "user", "list"),
        ("user", "-c", str(cfg), "list"),
        ("user", "list", "-c", str(cfg)),
        ("--config", str(cfg), "user", "list"),
        ("user", f"--config={cfg}", "list"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "postroom", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env_with_src(),
            timeout=60,
        )
        assert proc.returncode == 0 and "w@a.test" in proc.stdout, (args, proc.stderr)
    assert not (tmp_path / "postroom-data").exists()


def test_unreadable_passwords_fail_in_one_line(cfg: Path) -> None:
    # Both ended in a traceback: bytes that are not UTF-8, and no terminal for the prompts.
    base = [sys.executable, "-m", "postroom", "-c", str(cfg), "user", "add"]
    cases = [
        (
            ["b@a.test", "--password-stdin", "--allow-short"],
            b"\xff\xfe\n",
            b"postroom: the password is not valid",
        ),
        (["p@a.test"], b"", b"postroom: no password typed"),
    ]
    for args, stdin, message in cases:
        proc = subprocess.run(
            base + args, input=stdin, capture_output=True, env=env_with_src(), timeout=60
        )
        assert proc.returncode == 1
        assert message in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr


def test_a_user_whose_maildir_cannot_be_made_is_not_added(cfg: Path, tmp_path: Path) -> None:
    # "postroom: [Errno 20] Not a directory" and exit 1, yet the account was there.
    run_cli("user", "list", config=cfg)  # makes data_dir
    shutil.rmtree(tmp_path / "data" / "mail", ignore_errors=True)
    (tmp_path / "data" / "mail").write_text("not a directory")
    add = ["user", "add", "u@a.test", "--password-stdin", "--allow-short"]
    proc = run_cli(*add, config=cfg, stdin="secret\n", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "u@a.test" not in run_cli("user", "list", config=cfg).stdout
    (tmp_path / "data" / "mail").unlink()
    run_cli(*add, config=cfg, stdin="secret\n")  # not "already exists"
    assert run_cli("user", "list", config=cfg).stdout.split() == ["u@a.test"]


def test_serve_with_a_damaged_account_store_says_so_in_one_line(cfg: Path, tmp_path: Path) -> None:
    # A 32-line traceback, where every CLI command said it in one line.
    run_cli("user", "list", config=cfg)
    (tmp_path / "data" / "accounts.sqlite").write_bytes(b"garbage")
    cfg.write_text(cfg.read_text() + f'[listen]\nsmtp = ["127.0.0.1:{free_port()}"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", "serve", "-c", str(cfg)],
        capture_output=True, text=True, env=env_with_src(), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot start: the account store: file is not a database" in proc.stderr
    assert "Traceback" not in proc.stderr and "error: |" not in proc.stderr, proc.stderr


def test_config_from_environment(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTROOM_CONFIG", str(cfg))
    run_cli("user", "add", "e@a.test", "--password-stdin", "--allow-short", stdin="x\n")
    assert "e@a.test" in run_cli("user", "list", config=cfg).stdout
    monkeypatch.delenv("POSTROOM_CONFIG")
    monkeypatch.chdir(tmp_path)
    os.rename(cfg, tmp_path / "postroom.toml")
    assert "e@a.test" in run_cli("user", "list").stdout


def test_an_empty_config_name_is_an_error_not_the_embedded_default(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-c "$CONF"`` with an empty variable ran on the embedded default, making
    ./postroom-data silently (cfgedge probe): exit 2, nothing made."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTROOM_CONFIG", str(cfg))
    for args in (
        ("-c", "", "user", "list"),
        ("user", "list", "--config="),
        ("user", "-c", "", "list"),
    ):
        p = run_cli(*args, check=False)
        assert (
            p.returncode == 2 and p.stderr == "postroom: error: -c/--config: an empty file name\n"
        )
    assert not (tmp_path / "postroom-data").exists()


def test_a_user_and_an_alias_of_one_name_warn_that_the_alias_gets_its_mail(cfg: Path) -> None:
    """The alias wins (mail for the name goes to its targets): the mailbox ``user add`` makes
    would get nothing, silently, so it says so."""
    add = ("--password-stdin", "--allow-short")
    run_cli("user", "add", "bob@a.test", *add, config=cfg, stdin="pw\n")
    run_cli("alias", "add", "team@a.test", "bob@a.test", config=cfg)
    p = run_cli("user", "add", "team@a.test", *add, config=cfg, stdin="pw\n")
    assert "warning: team@a.test is also an alias (to bob@a.test)" in p.stderr
    p = run_cli("user", "add", "dave@a.test", *add, config=cfg, stdin="pw\n")
    assert "warning" not in p.stderr
    # And the other way round: an alias over a user takes its mail (a typo diverted it,
    # silently; contract probe). An alias that keeps a copy for the user says nothing.
    p = run_cli("alias", "add", "Dave@a.test", "bob@a.test", config=cfg)
    assert p.returncode == 0 and p.stdout == ""
    assert "warning: dave@a.test is also a user: its mail now goes to bob@a.test" in p.stderr
    p = run_cli("alias", "add", "dave@a.test", "dave@a.test", config=cfg)
    assert "warning" not in p.stderr


def test_an_address_literal_domain_gets_no_dns_records_or_dkim_keys(tmp_path: Path) -> None:
    """A local ``[192.0.2.1]`` (mail to user@[192.0.2.1]) has no zone to publish in: ``dns``
    printed records for ``[192.0.2.1].`` and DKIM keys were made for it."""
    path = tmp_path / "p.toml"
    path.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test", "[192.0.2.1]"]\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    for command in (("dns", "[192.0.2.1]"), ("dkim", "rotate", "[192.0.2.1]")):
        p = run_cli(*command, config=path, check=False)
        assert p.returncode == 1 and "address literal" in p.stderr, p.stderr
    assert run_cli("dns", "a.test", config=path).returncode == 0
    assert not [k for k in (tmp_path / "data").rglob("*") if "192.0.2.1" in k.name]
