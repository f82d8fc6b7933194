"""app.bind_listeners: the sockets a server serves on, made before its workers fork."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom import config as config_mod
from postroom.app import bind_listeners
from tests import conftest


def listen(tmp_path: Path, workers: int, **services: list[str]) -> config_mod.Config:
    return config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(tmp_path),
            "workers": workers,
            "listen": services,
        }
    )


def test_a_port_in_use_is_refused_also_for_several_workers(tmp_path: Path) -> None:
    # Each worker's socket joins an SO_REUSEPORT group, which joined another server's group
    # on the same port (two servers shared the mail, each getting some at random), or this
    # server's own other service named by another spelling of its address.
    port = conftest.free_port("127.0.0.1")
    first = bind_listeners(listen(tmp_path, 2, smtp=[f"127.0.0.1:{port}"]))
    try:
        for cfg in (
            listen(tmp_path, 2, smtp=[f"127.0.0.1:{port}"]),  # a second server
            listen(tmp_path, 1, smtp=[f"127.0.0.1:{port}"]),
        ):
            with pytest.raises(OSError, match="cannot listen on"):
                bind_listeners(cfg)
    finally:
        for listener in first:
            for sock in listener.socks:
                sock.close()
    other = conftest.free_port("127.0.0.1")
    spelled = listen(tmp_path, 2, smtp=[f"127.0.0.1:{other}"], pop3=[f"0x7f.0.0.1:{other}"])
    with pytest.raises(OSError, match=r"cannot listen on .*\(pop3\)"):
        bind_listeners(spelled)
    again = bind_listeners(listen(tmp_path, 2, smtp=[f"127.0.0.1:{other}"]))  # none left open
    for listener in again:
        assert len(listener.socks) == 2
        for sock in listener.socks:
            sock.close()
