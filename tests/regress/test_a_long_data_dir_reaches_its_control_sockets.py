"""A data_dir of some 95 characters or more made every control socket's path too long for an
AF_UNIX address (108 octets): ``serve`` died with "AF_UNIX path too long", and ``queue list``
and ``queue flush`` failed even with no server running (cfgedge probe). The sockets are now
reached through a descriptor of their directory when their path is that long."""

from __future__ import annotations

from tests.conftest import ServerFactory, wait_until


def test_a_long_data_dir_serves_and_takes_queue_commands(server_factory: ServerFactory) -> None:
    srv = server_factory(name="d" * 120, extra_toml="workers = 2", services=("smtp",))
    assert len(str(srv.data_dir / "control-1.sock")) > 108
    assert srv.cli("queue", "list").returncode == 0
    flushed = srv.cli("queue", "flush")
    assert "no server is running" not in flushed.stderr  # it reached the running server
    wait_until(lambda: "queue flush: 0 deferred messages due now" in srv.log.read_text())
    srv.stop()
    assert "no server is running" in srv.cli("queue", "flush").stderr
