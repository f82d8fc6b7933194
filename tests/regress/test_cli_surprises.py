"""What a new admin met on the first day: help showing ``CONFIG_SUB``, no ``--version``, second-
level commands without help, ``queue flush`` silent with no server running, no warning when
serving as root without ``user`` or with ``hostname = "localhost"``, and a ``GetPassWarning``
with a Python path when a password was piped in without ``--password-stdin`` (it is now read
from stdin: one line, and a second one, if any, must repeat it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from postroom import __version__
from tests.conftest import ServerFactory, env_with_src, wait_until

SECOND_LEVEL = {
    "user": ["add", "passwd", "del", "list"],
    "alias": ["add", "del", "list"],
    "queue": ["list", "show", "flush", "delete"],
}


def postroom(
    *args: str, stdin: str = "", cfg: Path | None = None
) -> subprocess.CompletedProcess[str]:
    extra = ["-c", str(cfg)] if cfg is not None else []
    return subprocess.run(
        [sys.executable, "-m", "postroom", *args, *extra],
        input=stdin,
        capture_output=True,
        text=True,
        env=env_with_src(),
        timeout=60,
        start_new_session=True,  # no controlling terminal: getpass cannot open /dev/tty
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    return path


def test_help_names_the_option_argument_file_and_every_command() -> None:
    for args in (["--help"], *([group, "--help"] for group in SECOND_LEVEL)):
        out = postroom(*args)
        assert out.returncode == 0
        assert "CONFIG_SUB" not in out.stdout and "-c FILE" in out.stdout
    for group, actions in SECOND_LEVEL.items():
        listing = postroom(group, "--help").stdout
        for action in actions:
            (line,) = [ln for ln in listing.splitlines() if ln.strip().startswith(action + " ")]
            assert len(line.split()) > 1, f"{group} {action} has no help text"
            assert postroom(group, action, "--help").returncode == 0


def test_version() -> None:
    out = postroom("--version")
    assert out.returncode == 0
    assert out.stdout == f"postroom {__version__}\n"


def test_queue_flush_without_a_server_says_when_it_happens(cfg: Path) -> None:
    out = postroom("queue", "flush", cfg=cfg)
    assert out.returncode == 0
    assert "no server is running" in out.stderr


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        ("pass-word\n", 0),
        ("pass-word\npass-word\n", 0),
        ("pass-word\r\npass-word\r\n", 0),
        ("pass-word\nother-word\n", 1),
    ],
)
def test_piped_password_without_the_flag_is_read_cleanly(cfg: Path, stdin: str, code: int) -> None:
    out = postroom("user", "add", "alice@a.test", stdin=stdin, cfg=cfg)
    assert out.returncode == code, out.stderr
    assert "Warning" not in out.stderr and "getpass" not in out.stderr
    assert out.stderr.count("\n") <= 1 or "created a new data directory" in out.stderr
    if code == 1:
        assert out.stderr.endswith("postroom: passwords do not match\n")
    else:
        assert postroom("user", "list", cfg=cfg).stdout == "alice@a.test\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_serving_as_root_without_user_or_as_localhost_warns(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test",), hostname="localhost", services=("smtp",))
    log = srv.log.read_text()
    assert f"postroom: warning: {srv.config}: user: running as root without `user`" in log
    assert f'postroom: warning: {srv.config}: hostname: "localhost": other mail servers' in log


def test_a_pop3_idle_timeout_under_ten_minutes_warns(server_factory: ServerFactory) -> None:
    # RFC 1939 §3: at least 10 minutes. Allowed (tests and odd setups want less), but said.
    short = server_factory(services=("pop3",), extra_toml='[limits]\npop3_idle_timeout = "1m"')
    assert "limits.pop3_idle_timeout: under 10 minutes" in short.log.read_text()
    usual = server_factory(services=("pop3",), name="usual")
    assert "limits.pop3_idle_timeout" not in usual.log.read_text()
    # A reload says the same (it said nothing: an emptied config file reloaded quietly as
    # hostname "localhost", refusing mail for the real domains; cfgedge probe).
    text = usual.config.read_text()
    usual.config.write_text(
        text.replace("[listen]", '[limits]\npop3_idle_timeout = "1m"\n[listen]')
    )
    assert usual.proc is not None
    usual.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "reload: " in usual.log.read_text() and "under 10 minutes" in usual.log.read_text()
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_root_command_on_another_users_data_warns(cfg: Path) -> None:
    data = cfg.parent / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)
    out = postroom("user", "list", cfg=cfg)
    assert out.returncode == 0
    assert f"{data} belongs to uid 65534, but this runs as root without `user`" in out.stderr
