"""A second ``postroom serve`` with the same ``data_dir`` (other ports: a second config file, a
unit started twice) ran beside the first: two queue runners on one queue, and when it stopped
it removed the first one's control socket, so ``queue flush`` said "no server is running" and
no longer reached the server that was. Now the second one exits 1 at once, naming the
directory, and leaves the first alone."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ServerFactory, env_with_src, free_port


def test_second_serve_on_the_same_data_dir_exits_1(server_factory: ServerFactory) -> None:
    first = server_factory(host="127.0.0.177", services=("smtp",))
    port = first.ports["smtp"]
    second = first.config.with_name("second.toml")
    second.write_text(first.config.read_text().replace(f":{port}", f":{free_port('127.0.0.177')}"))
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", "serve", "-c", str(second)],
        capture_output=True,
        text=True,
        env=env_with_src(),
        timeout=30,  # it used to serve on: a time-out is the failure
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("postroom: error: ") and str(first.data_dir) in last, proc.stderr
    assert "Traceback" not in proc.stderr

    flush = first.cli("queue", "flush")
    assert "no server is running" not in flush.stderr
    assert (first.data_dir / "control.sock").exists()
    assert first.stop() == 0
