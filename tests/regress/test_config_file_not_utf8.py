"""A config file that is not UTF-8 (one Latin-1 byte in a comment is enough) or nests arrays
deeper than the TOML parser recurses gave a traceback and exit 1 instead of the one line
``postroom: error: FILE: reason`` and exit 2; worse, SIGHUP with such a file killed the running
server, where a bad config at a reload must leave the running one in place."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, run_cli, wait_until

BROKEN = {
    "latin1_comment": b'domains = ["a.test"]\n# caf\xe9\n',
    "latin1_value": b'hostname = "caf\xe9"\ndomains = ["a.test"]\n',
    "deep_array": b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_unreadable_config_file_is_one_line_and_exit_2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(BROKEN[name])
    for args in (("user", "list"), ("queue", "list"), ("serve",)):
        proc = run_cli(*args, config=path, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"postroom: error: {path}: "), lines


def test_reload_of_a_file_that_is_not_utf8_keeps_the_server(server_factory: ServerFactory) -> None:
    srv = server_factory(host="127.0.0.173", services=("smtp",))
    good = srv.config.read_bytes()
    srv.config.write_bytes(good + b"# caf\xe9\n")
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in srv.log.read_text(), 10, "the reload to fail")
    assert srv.proc.poll() is None, srv.log.read_text()
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as client:
        assert client.noop()[0] == 250
    srv.config.write_bytes(good)
    assert srv.stop() == 0
