"""The README's first command: ``postroom serve`` with no config file, in an empty directory.

Regression: with the embedded default the data directory was relative, and local delivery
linked the new Maildir file against "/" instead of the working directory: every message was
deferred with "No such file or directory".
"""

from __future__ import annotations

import poplib
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import env_with_src, insecure, wait_until


def test_serve_without_config_receives_and_serves_mail(tmp_path: Path) -> None:
    env = env_with_src()
    env.pop("POSTROOM_CONFIG", None)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return "postroom: ready" in log.read_text()

        wait_until(ready, 30, "the server to start")
        # A command that finds this data from any directory (issue 14).
        assert f"add a user with: cd {tmp_path} && postroom user add you@localhost" in (
            log.read_text()
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "postroom",
                "user",
                "add",
                "you@localhost",
                "--password-stdin",
                "--allow-short",
            ],
            input="secret\n",
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
            smtp.sendmail("a@b.test", ["you@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
        assert len(list((tmp_path / "postroom-data/mail/localhost/you/new").iterdir())) == 1
        pop = poplib.POP3("127.0.0.1", 2110, timeout=10)
        pop.stls(context=insecure())
        pop.user("you@localhost")
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        assert b"hello" in pop.retr(1)[1]
        pop.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
