"""Without a config file data lives in ./postroom-data of the directory a command runs in, so
``postroom user add`` run elsewhere silently made a second store that the running server never
saw. A command that makes a new data directory now says so, with its absolute path, and
``serve`` prints a ``user add`` command that reaches its data from any directory."""

from __future__ import annotations

import shlex
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ServerFactory, env_with_src


def postroom(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = env_with_src()
    env.pop("POSTROOM_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "postroom", *args],
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_hint(hint: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``user add`` that ``serve`` printed, as a user pastes it into a shell."""
    words = shlex.split(hint)
    assert words[:2] == ["cd", words[1]] and words[2:6] == ["&&", "postroom", "-c", words[5]]
    assert Path(words[1]).is_absolute() and Path(words[5]).is_absolute()
    return postroom(*words[4:], "--password-stdin", cwd=Path(words[1]), stdin="pass-word\n")


def test_the_hint_reaches_a_relative_data_dir_of_the_config_file(tmp_path: Path) -> None:
    """A config file may name its data_dir relative to where commands run: the hint printed
    with ``-c FILE`` alone made a second store when run from elsewhere."""
    here = tmp_path / "here"
    here.mkdir()
    config = here / "postroom.toml"
    config.write_text('hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "rel-data"\n')
    env = env_with_src()
    hint = subprocess.run(
        [sys.executable, "-c", HINT, str(config)],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_hint(hint, elsewhere)
    assert done.returncode == 0, done.stderr
    assert (here / "rel-data").is_dir()
    assert not (elsewhere / "rel-data").exists()


HINT = (
    "import sys; from pathlib import Path; from postroom import config, datadir; "
    "print(datadir.add_user_command(config.load(Path(sys.argv[1]))))"
)


def test_a_new_data_directory_is_announced_with_its_path(tmp_path: Path) -> None:
    first = postroom(
        "user", "add", "you@localhost", "--password-stdin", cwd=tmp_path, stdin="pass-word\n"
    )
    assert first.returncode == 0, first.stderr
    made = tmp_path / "postroom-data"
    assert f"created a new data directory {made}\n" in first.stderr
    assert str(tmp_path) in first.stderr.splitlines()[1]  # where to run the next commands
    again = postroom("user", "list", cwd=tmp_path)
    assert again.stdout == "you@localhost\n"
    assert "created" not in again.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = postroom("user", "list", cwd=elsewhere)
    assert f"created a new data directory {elsewhere / 'postroom-data'}" in other.stderr


def test_serve_prints_a_user_add_that_works_from_anywhere(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    srv = server_factory(domains=("a.test",), services=("smtp",))
    log = srv.log.read_text()
    line = next(ln for ln in log.splitlines() if "add a user with:" in ln)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_hint(line.split("add a user with:", 1)[1], elsewhere)
    assert done.returncode == 0, done.stderr
    assert not (elsewhere / "postroom-data").exists()
    deadline = time.monotonic() + 5  # the running server sees new users within a second
    while True:
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=10) as c:
            c.ehlo()
            c.mail("x@remote.test")
            code, _ = c.rcpt("you@a.test")
        if code == 250 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert code == 250
