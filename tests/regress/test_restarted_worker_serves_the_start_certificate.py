"""A worker started again after a crash served the certificate (and ran the configuration)
of the server's start, not what the last SIGHUP loaded: after a renewal and a reload, one
crash put the old, soon expired, certificate back on every TLS port that worker answers. Now
a worker started again gets the supervisor's current configuration and TLS pair."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import ServerFactory
from tests.regress.test_certificate_reload import (
    SERVICES,
    reload,
    served,
    tls_table,
    write_pair,
)


def test_restarted_worker_serves_the_reloaded_certificate(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    certs = tmp_path / "live"
    write_pair(certs, "first")
    srv = server_factory(services=SERVICES, extra_toml=tls_table(certs))
    new = write_pair(certs, "renewed")
    reload(srv, 1)
    assert served(srv, "submissions") == new
    os.kill(srv.worker_pid(), signal.SIGKILL)
    srv.worker_pid(started=2, timeout=15)
    deadline = time.monotonic() + 15
    for service in SERVICES:
        while True:  # the new worker listens once it is ready
            try:
                der = served(srv, service)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert der == new, service
    assert srv.stop() == 0
