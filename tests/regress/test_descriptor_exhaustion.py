"""When file descriptors ran out, connections were accepted and closed without a word (libuv
accepts and drops them at EMFILE). Now a connection that takes one of the last descriptors
gets ``421`` (SMTP) or ``-ERR [SYS/TEMP]`` (POP3) and is closed; the reserve stays free."""

from __future__ import annotations

import os
import socket
import subprocess

from postroom.services import FD_RESERVE
from tests.conftest import ServerFactory, first_line, need_tool, wait_greeting


def test_out_of_descriptors_gets_421_not_silence(server_factory: ServerFactory) -> None:
    prlimit = need_tool("prlimit")
    srv = server_factory(services=("smtp", "pop3"))
    pid = srv.worker_pid()
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    limit = in_use + FD_RESERVE + 10  # room for about ten connections
    subprocess.run([prlimit, "--pid", str(pid), f"--nofile={limit}:{limit}"], check=True)
    held: list[socket.socket] = []
    answers: list[bytes] = []
    try:
        for i in range(30):
            service = "smtp" if i % 2 else "pop3"
            s = socket.create_connection((srv.host, srv.ports[service]), timeout=10)
            held.append(s)
            answers.append(first_line(s))
        assert all(a for a in answers), answers  # nobody was closed without a word
        refused = [a for a in answers if a.startswith((b"421 ", b"-ERR [SYS/TEMP]"))]
        served = [a for a in answers if a.startswith((b"220 ", b"+OK"))]
        assert len(refused) + len(served) == len(answers), answers
        assert refused and served, answers
    finally:
        for s in held:
            s.close()
    # ...and it serves again once they are gone (the server notices the closes soon after).
    wait_greeting(srv.host, srv.ports["smtp"])
