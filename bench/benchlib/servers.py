"""What every server under test looks like to the cases: addresses, mailboxes, a name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "bench.test"
RELAY_DOMAIN = "relay.test"
# The MAIL FROM and From: domain of the auth group's signed message: not under .test, which
# the Unbound inside OpenDKIM answers itself (RFC 6761 special-use names), with NXDOMAIN.
SENDER_DOMAIN = "src.example"
PASSWORD = "bench-secret"
NOBODY = (65534, 65534)


def users(count: int, domain: str = DOMAIN) -> list[str]:
    """``u1@bench.test`` .. ``uN@bench.test``."""
    return [f"u{i}@{domain}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class Addr:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Server:
    """A started server: the services it offers and where its Maildirs are."""

    name: str
    mail_root: Path  # mailbox of user@domain is mail_root/domain/user
    smtp: Addr | None = None
    submission: Addr | None = None
    pop3: Addr | None = None
    owner: tuple[int, int] | None = None  # uid/gid the Maildir files must belong to
    notes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None  # set when we run it in the foreground
    log: Path | None = None

    def exit_status(self) -> int | None:
        """None while running (or when not ours to watch), else the exit status."""
        return None if self.proc is None else self.proc.poll()

    def mailbox(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail_root / domain / local
