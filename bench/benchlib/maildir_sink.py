"""aiosmtpd reference: accept any recipient and store each message durably in one Maildir.

Run as its own process: ``python maildir_sink.py HOST PORT MAILDIR``. Each message is written to
tmp/, fsync'ed, renamed into new/, and new/ is fsync'ed before the 250 goes out; the blocking I/O
runs in the default thread pool (``asyncio.to_thread``), so concurrent sessions overlap their
fsyncs the way a careful asyncio server would. Uses uvloop when installed, like postroom.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_counter = itertools.count()


def store(maildir: Path, data: bytes) -> str:
    """Durably add ``data`` to ``maildir``; returns the new file name."""
    name = f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.sink,S={len(data)}"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, maildir / "new" / name)
    dir_fd = os.open(maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return name


class MaildirHandler:
    """aiosmtpd handler hooks: every RCPT accepted, DATA stored before the reply."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: Any = envelope.original_content or envelope.content or b""
        data = f"Return-Path: <{envelope.mail_from}>\r\n".encode() + bytes(content)
        name = await asyncio.to_thread(store, self.maildir, data)
        return f"250 2.0.0 OK {name}"


async def serve(host: str, port: int, maildir: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    handler = MaildirHandler(maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler, hostname="sink.bench.test", decode_data=False, data_size_limit=52428800
        ),
        host,
        port,
        family=socket.AF_INET,
        reuse_address=True,
        backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    host, port, maildir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, maildir))
    else:
        uvloop.run(serve(host, port, maildir))


if __name__ == "__main__":
    main()
