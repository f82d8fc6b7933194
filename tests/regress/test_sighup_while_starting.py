"""A SIGHUP in the first second of `serve` (`systemctl reload` right after start) killed the
server with no word (exit 129): SIGHUP's default action until the supervisor took it. A
worker hit by one while it started died too, and at the first start that stopped the server.
A SIGTERM or SIGINT in the first half second likewise ended it by the signal (exit 143 and a
KeyboardInterrupt's traceback), not as a stop (exit 0). (ops probe)"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import Server, ServerFactory, env_with_src, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_a_sighup_while_the_server_starts_is_a_reload_not_its_end(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(services=("smtp",), start=False)
    for start, delay in itertools.product(_starts(), (0.1, 0.2, 0.3, 0.6)):
        proc = _serve(srv, start)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda p=proc: p.poll() is not None or "ready" in srv.log.read_text(), 20)
            assert proc.poll() is None, srv.log.read_text()  # (and it serves: ready)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        srv.log.write_text("")


def test_a_stop_while_the_server_starts_is_a_stop(server_factory: ServerFactory) -> None:
    srv = server_factory(services=("smtp",), start=False)
    for start, delay, sig in itertools.product(
        _starts(), (0.1, 0.25), (signal.SIGTERM, signal.SIGINT)
    ):
        proc = _serve(srv, start)
        time.sleep(delay)
        proc.send_signal(sig)
        assert proc.wait(15) == 0, (start, delay, sig, srv.log.read_text())
        assert "Traceback" not in srv.log.read_text()
        srv.log.write_text("")


def _serve(srv: Server, start: list[str]) -> subprocess.Popen[bytes]:
    """``serve`` with ``srv``'s config, its stderr added to ``srv.log``."""
    with open(srv.log, "ab") as log:
        return subprocess.Popen(
            [*start, "serve", "-c", str(srv.config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env_with_src(),
            start_new_session=True,
        )


def _starts() -> list[list[str]]:
    # ``python -m postroom``, and the console script pip makes from pyproject's entry point
    # (systemd runs that one: it imported the whole server before SIGHUP was taken).
    # (Not sooner than 0.1 s: before about 40 ms, more on a busy machine, the interpreter is
    # still starting and no program can hold a signal yet.)
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = entry["postroom"].split(":")
    script = f"import sys; from {module} import {func}; sys.exit({func}())"
    return [[sys.executable, "-m", "postroom"], [sys.executable, "-c", script]]
