"""What every server under test looks like to the cases: addresses, mailboxes, a name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from benchlib import maildir

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


class MailStore(Protocol):
    """Where a server keeps its mailboxes, as the cases count, empty and fill them."""

    def count(self, user: str) -> int:
        """Messages delivered to ``user`` and not yet fetched (Maildir ``new/``)."""
        ...

    def count_messages(self, user: str) -> int:
        """Every message of ``user`` (Maildir ``new/`` and ``cur/``)."""
        ...

    def clear(self, user: str) -> None: ...

    def fill(self, user: str, messages: int, size: int) -> None:
        """Pre-fill for POP3: ``messages`` identical messages of about ``size`` octets."""
        ...


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
    store: MailStore | None = None  # None: Maildirs under mail_root

    @property
    def mail(self) -> MailStore:
        return self.store or MaildirStore(self)

    def exit_status(self) -> int | None:
        """None while running (or when not ours to watch), else the exit status."""
        return None if self.proc is None else self.proc.poll()

    def mailbox(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail_root / domain / local


@dataclass
class MaildirStore:
    """The Maildirs of a server (every server but postroom on PostgreSQL)."""

    server: Server

    def count(self, user: str) -> int:
        return maildir.count(self.server.mailbox(user))

    def count_messages(self, user: str) -> int:
        return maildir.count_messages(self.server.mailbox(user))

    def clear(self, user: str) -> None:
        maildir.clear(self.server.mailbox(user))

    def fill(self, user: str, messages: int, size: int) -> None:
        maildir.fill(self.server.mailbox(user), messages, size, user, self.server.owner)
