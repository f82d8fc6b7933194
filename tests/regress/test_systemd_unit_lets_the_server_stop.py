"""Under the shipped systemd unit every stop exited 1 ("Operation not permitted"): its
capability bounding set lacked CAP_KILL, and the supervisor, which stays root, could not
signal its workers, which run as ``user`` (newadmin probe). The server is started here with
the unit's bounding set and no new privileges, as systemd starts it, and stopped as
``systemctl stop`` does (SIGTERM to the main process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, need_tool

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "postroom.service"


def bounding_set() -> str:
    """The unit's CapabilityBoundingSet as setpriv takes it: -all,+net_bind_service,..."""
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("CapabilityBounding"))
    caps = line.split("=", 1)[1].split()
    return ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])


@pytest.mark.skipif(os.geteuid() != 0, reason="the unit starts postroom as root")
def test_the_server_under_the_units_capabilities_stops_with_exit_0() -> None:
    setpriv = need_tool("setpriv")
    base = Path(tempfile.mkdtemp(prefix="postroom-unit-"))
    base.chmod(0o755)  # the mail user must reach data_dir
    try:
        cfg = base / "postroom.toml"
        cfg.write_text(
            f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{base}/data"\n'
            f'user = "nobody"\n[listen]\nsmtp = ["127.0.0.1:{free_port()}"]\n'
        )
        log = base / "log"
        as_systemd = [setpriv, "--no-new-privs", f"--bounding-set={bounding_set()}"]
        serve = [sys.executable, "-m", "postroom", "serve", "-c", str(cfg)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*as_systemd, "--inh-caps=-all", *serve],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 30
            while "postroom: ready" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            assert "postroom: ready" in log.read_text(), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)
