"""A SIGHUP in the first second of `serve` (`systemctl reload` right after start) killed the
server with no word (exit 129): SIGHUP's default action until the supervisor took it. A
worker hit by one while it started died too, and at the first start that stopped the server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.conftest import ServerFactory, env_with_src, wait_until


def test_a_sighup_while_the_server_starts_is_a_reload_not_its_end(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(services=("smtp",), start=False)
    for delay in (0.1, 0.3, 0.6):  # (earlier, the interpreter itself is not yet up)
        with open(srv.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "postroom", "serve", "-c", str(srv.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env_with_src(),
                start_new_session=True,
            )
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda p=proc: p.poll() is not None or "ready" in srv.log.read_text(), 20)
            assert proc.poll() is None, srv.log.read_text()  # (and it serves: ready)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        srv.log.write_text("")
