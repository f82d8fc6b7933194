"""With ``log_format = "json"`` every stderr line is one JSON object: the line that says why
``serve`` could not start was plain text, the one a JSON pipeline dropped."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, run_cli


def test_a_port_in_use_is_a_json_line(server_factory: ServerFactory) -> None:
    node = server_factory(services=("smtp",), extra_toml='log_format = "json"\n', start=False)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind((node.host, node.ports["smtp"]))
    taken.listen()
    try:
        p = run_cli("serve", config=node.config, check=False)
    finally:
        taken.close()
    assert p.returncode == 1
    lines = [json.loads(line) for line in p.stderr.splitlines()]  # every one parses
    errors = [x for x in lines if x["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "startup"
    assert errors[0]["message"].startswith("postroom: error: ")
    assert "in use" in errors[0]["message"]


def test_an_ipv6_endpoint_in_use_is_named_as_listen_writes_it(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET6)
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        taken.bind(("::1", 0))
    except OSError:
        taken.close()
        pytest.skip("no ::1 on this machine")
    taken.listen()
    port = taken.getsockname()[1]
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{tmp_path}/data"\n'
        f'[listen]\nsmtp = ["[::1]:{port}"]\n'
    )
    try:
        p = run_cli("serve", config=cfg, check=False)
    finally:
        taken.close()
    assert p.returncode == 1
    assert f"cannot listen on [::1]:{port} (smtp)" in p.stderr  # not "::1:PORT"
