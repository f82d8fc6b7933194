"""A password argon2 could not check (out of memory) is no wrong password: SMTP answers
454 4.7.0 and POP3 -ERR [SYS/TEMP], and no failed login is counted (exhaust probe: 535 and
-ERR [AUTH], and the client's IP on its way to a lockout, for the right password)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from argon2.exceptions import VerificationError

from postroom.app import build_services
from postroom.config import from_dict
from postroom.connection import Connection
from postroom.pop3.server import Pop3Connection
from postroom.services import Services
from postroom.smtp.server import SmtpConnection
from postroom.storage import credentials
from tests.unit.test_connection import FakeTransport


class NoMemory:
    def hash(self, password: str) -> str:
        return "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"

    def verify(self, stored: str, password: str) -> bool:
        raise VerificationError("Memory allocation error")


def _services(tmp_path: Path) -> Services:
    cfg = from_dict(
        {"domains": ["a.test"], "data_dir": str(tmp_path), "auth": {"allow_plaintext": True}}
    )
    services, _runner = build_services(cfg)
    return services


async def _exchange(conn: Connection, lines: bytes, until: bytes) -> bytes:
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(lines)
    out = b""
    for _ in range(500):  # the check runs on a thread: its answer comes a moment later
        out += transport.take()
        if until in out:
            break
        await asyncio.sleep(0.01)
    return out


def test_smtp_and_pop3_say_try_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "_HASHER", NoMemory())
    services = _services(tmp_path)
    plain = base64.b64encode(b"\0alice@a.test\0right").decode()

    async def main() -> tuple[bytes, bytes]:
        smtp = SmtpConnection(services, "submission", implicit_tls=False)
        said = await _exchange(smtp, f"EHLO c\r\nAUTH PLAIN {plain}\r\n".encode(), b"454 ")
        pop = Pop3Connection(services, implicit_tls=False)
        told = await _exchange(pop, b"USER alice@a.test\r\nPASS right\r\n", b"-ERR")
        return said, told

    said, told = asyncio.run(main())
    assert b"454 4.7.0 Temporary authentication failure\r\n" in said
    assert told.endswith(b"-ERR [SYS/TEMP] Temporary authentication failure, try again later\r\n")
    assert services.throttle.failures("192.0.2.7") == 0
