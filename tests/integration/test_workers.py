"""``workers = 2``: both processes serve, spooled mail reaches the primary's queue runner,
and a kill -9 of the primary leaves no worker behind holding the ports."""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
import threading

import pytest

from tests.conftest import ServerFactory, wait_until
from tests.dnszone import LoopbackDNS


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def is_writer(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"postroom.storage.local.maildir_writer" in f.read()


def test_two_workers(server_factory: ServerFactory) -> None:
    dns = LoopbackDNS()  # knows no domain: remote mail bounces with 5.1.2
    try:
        srv = server_factory(
            domains=("a.test",),
            services=("smtp", "submission"),
            extra_toml=f'workers = 2\n[dns]\nnameservers = ["{dns.nameserver}"]\n',
        )
        srv.add_user("alice@a.test", "pw")
        assert srv.proc is not None
        children = children_of(srv.proc.pid)
        workers = [p for p in children if not is_writer(p)]
        assert len(workers) == 1
        writers = [p for p in children if is_writer(p)] + [
            p for w in workers for p in children_of(w) if is_writer(p)
        ]
        assert len(writers) == 2  # each worker has its Maildir writer process

        def send(i: int) -> None:
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
                c.sendmail(
                    "x@r.test", ["alice@a.test"], f"Subject: local {i}\r\n\r\nx\r\n".encode()
                )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(srv.wait_messages("alice@a.test", 40)) == 40

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for i in range(6):  # several connections: both workers spool some of them
            with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
                c.starttls(context=ctx)
                c.login("alice@a.test", "pw")
                c.sendmail(
                    "alice@a.test",
                    ["bob@nowhere.test"],
                    f"Subject: remote {i}\r\n\r\nx\r\n".encode(),
                )
        msgs = srv.wait_messages("alice@a.test", 46, timeout=30)
        assert len(msgs) == 46  # six bounces came back through the primary's runner
        assert sum(b"Status: 5.1.2" in m for m in msgs) == 6

        srv.kill9()
        gone = workers + writers  # and nothing of the old server stays behind
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in gone), 5)
        srv.start()
        send(99)
        assert len(srv.wait_messages("alice@a.test", 47)) == 47
        assert srv.stop() == 0
    finally:
        dns.stop()


def test_pin_cpus_puts_the_loop_and_its_writer_on_cpus_of_their_own(
    server_factory: ServerFactory,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pin_cpus needs two CPUs; this machine has one")
    srv = server_factory(domains=("a.test",), services=("smtp",), extra_toml="pin_cpus = true\n")
    srv.add_user("alice@a.test", "pw")
    assert srv.proc is not None
    (writer,) = [p for p in children_of(srv.proc.pid) if is_writer(p)]
    assert os.sched_getaffinity(srv.proc.pid) == {cpus[0]}
    assert os.sched_getaffinity(writer) == {cpus[1]}
    for tid in os.listdir(f"/proc/{writer}/task"):  # its threads too (the syncer)
        assert os.sched_getaffinity(int(tid)) == {cpus[1]}
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: pinned\r\n\r\nx\r\n")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
