"""Files the server makes under data_dir are for its user alone, whatever the umask: the
journal, its body files, the deferred queue and the Maildirs (directories 0700, files 0600).

Before, ``mkdir(parents=True)`` made every parent level with the umask's mode (0755)."""

from __future__ import annotations

import os
import smtplib
import stat
import time

from tests.conftest import ServerFactory


def test_nothing_the_server_makes_is_readable_by_others(server_factory: ServerFactory) -> None:
    old = os.umask(0o022)
    try:
        srv = server_factory(
            domains=("a.test",),
            services=("smtp",),
            extra_toml=(
                '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
                '[delivery]\nretry_intervals = ["1h"]'
            ),
        )
    finally:
        os.umask(old)
    srv.add_user("alice@a.test")
    srv.cli("alias", "add", "both@a.test", "alice@a.test", "x@unreachable.test")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("s@r.test", ["both@a.test"], b"Subject: small\r\n\r\nx\r\n")
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 200
        c.sendmail("s@r.test", ["both@a.test"], big)
    srv.wait_messages("alice@a.test", 2)
    queued = srv.data_dir / "queue" / "msg"
    for _ in range(1200):  # both wait for their retry in the deferred store (bounded: 60 s)
        if len(os.listdir(queued)) == 2:
            break
        time.sleep(0.05)
    assert len(os.listdir(queued)) == 2
    ours = ["journal", "queue", "mail"]
    for top in ours:
        for root, dirs, files in os.walk(srv.data_dir / top):
            for d in dirs:
                mode = stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode)
                assert mode == 0o700, (os.path.join(root, d), oct(mode))
            for f in files:
                mode = stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode)
                assert mode == 0o600, (os.path.join(root, f), oct(mode))
    for top in ours:
        assert stat.S_IMODE(os.stat(srv.data_dir / top).st_mode) == 0o700
