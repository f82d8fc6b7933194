"""A second SIGTERM (or SIGINT) while the server ends, after it has logged ``stopped (exit
status 0)``, ended the process by the signal (-15): Python's exit puts the default actions
back. The stopped server ignores them now. (recheck probe)"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time

from tests.conftest import ServerFactory, env_with_src, wait_until


def test_a_second_signal_while_the_server_ends_changes_nothing(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(services=("smtp",), start=False)
    for gap, sig in itertools.product((0.05, 0.1), (signal.SIGTERM, signal.SIGINT)):
        with open(srv.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "postroom", "serve", "-c", str(srv.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env_with_src(),
                start_new_session=True,
            )
        wait_until(lambda p=proc: p.poll() is not None or "ready" in srv.log.read_text(), 20)
        proc.send_signal(sig)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(sig)
        assert proc.wait(15) == 0, (gap, sig, srv.log.read_text())
        srv.log.write_text("")
