"""What the queue knows about a message besides its octets: envelope, recipients, attempts.

Plain data with a JSON form; every queue backend stores these, and the runner, the CLI and the
SMTP policy share them. No I/O here.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from postroom.errors import QueueError

Status = Literal["queued", "deferred", "delivered", "bounced"]
_STATUSES = frozenset(("queued", "deferred", "delivered", "bounced"))
MAX_TIME = 253402300800.0  # 10000-01-01 UTC: a time past it is damage (no date can show it)

_ID_SEQUENCE = itertools.count()
_ID_PROCESS: tuple[int, str] = (0, "")  # (pid, this process's random part), made after fork


def _process_part() -> str:
    """The pid and a random part drawn once per process (again in a forked child, whose pid
    differs): a pid is unique only on its machine, and nodes on several machines share one
    queue (PostgreSQL), where two workers with the same pid would otherwise make equal ids."""
    global _ID_PROCESS
    pid = os.getpid()
    if _ID_PROCESS[0] != pid:
        _ID_PROCESS = (pid, f"{pid & 0xFFFFFF:06X}{secrets.randbits(32):08X}")
    return _ID_PROCESS[1]


def new_queue_id(now: float | None = None) -> str:
    """Sortable, unique id: microseconds since the epoch, the process id and a random part
    drawn per process, a sequence number (32 uppercase hex digits).

    The process id keeps the ids of forked workers on one machine apart: a sequence alone is
    copied by ``fork`` and two workers would make the same id in the same microsecond (and the
    same Maildir file name, one message overwriting the other). A pid is reused only after its
    process has exited, and a process makes fewer than 65,536 ids in one microsecond. The
    random part (32 bits) keeps processes of other machines apart, which may have the same pid.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014X}{_process_part()}{next(_ID_SEQUENCE) & 0xFFFF:04X}"


def is_queue_id(name: str) -> bool:
    """Could ``name`` be one of :func:`new_queue_id`'s (letters and digits only, so never a
    path such as ``../accounts.sqlite``)?"""
    return name.isascii() and name.isalnum() and 0 < len(name) <= 64


def check_id(queue_id: str) -> None:
    """QueueError unless ``queue_id`` could be one of :func:`new_queue_id`'s."""
    if not is_queue_id(queue_id):
        raise QueueError(f"no such message {queue_id}")


@dataclass
class Recipient:
    """One envelope recipient and where its delivery stands."""

    address: str
    original: str | None = None  # the RCPT address when an alias was expanded (or ORCPT)
    orcpt: str | None = None
    notify: list[str] | None = None
    status: Status = "queued"
    last_error: str | None = None
    remote_mta: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("delivered", "bounced")


@dataclass
class Attempt:
    """One delivery attempt of some recipients of a message, as ``queue show`` lists it.

    ``host`` is the MX host name (``"local"`` for a Maildir delivery, None when no host was
    reached, e.g. DNS failed), ``ip`` the address dialled, ``tls`` whether the session was
    encrypted, ``reply`` the remote reply in full (or our own words for a local failure)."""

    time: float
    recipients: list[str]
    host: str | None
    ip: str | None
    reply: str
    tls: bool = False


@dataclass
class PendingReport:
    """A DSN (RFC 3464) decided by an attempt and stored with its outcome before it is queued
    under ``id``: the recipients it reports (their indices), each with its action
    (``failed``, ``delivered`` or ``relayed``), at ``time``; or, owed from acceptance, the
    aliases of several addresses it reports ``expanded`` (``expanded``: each as RCPT named it,
    with its ORCPT). Made again after a crash unless the queue holds ``id`` (see
    :mod:`postroom.queue.runner`)."""

    id: str
    recipients: list[int]
    actions: list[str]
    time: float
    expanded: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass
class Envelope:
    """A queued message: the SMTP envelope, per-recipient state and the attempt history."""

    id: str
    sender: str  # "" is the null reverse-path
    recipients: list[Recipient]
    created: float
    size: int = 0  # of the message as stored (LF line ends)
    wire_size: int = 0  # the same with CRLF line ends, as SMTP and POP3 send it
    client_ip: str = ""
    helo: str = ""
    auth_user: str | None = None
    service: str = ""  # the listener it came in on ("" for a message made here, a DSN)
    tls_version: str | None = None  # of the client's session, if encrypted
    envid: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    is_bounce: bool = False
    history: list[Attempt] = field(default_factory=list)
    reports: list[PendingReport] = field(default_factory=list)  # DSNs owed, not yet queued
    parent: str = ""  # of a DSN: the message it reports on, which may still owe it

    @property
    def done(self) -> bool:
        return all(r.done for r in self.recipients)

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives, at a fraction of its cost (it is on every message).
        data = dict(vars(self))
        data["recipients"] = [dict(vars(r)) for r in self.recipients]
        data["history"] = [dict(vars(a)) for a in self.history]
        # Left out when empty (nearly always): an older node reads the message as before.
        if self.reports:
            data["reports"] = [_report_dict(r) for r in self.reports]
        else:
            del data["reports"]
        if not self.parent:
            del data["parent"]
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        data = dict(data)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        data["history"] = [Attempt(**a) for a in data.get("history", ())]
        data["reports"] = [_report(r) for r in data.get("reports", ())]
        envelope = cls(**data)
        # What the queue acts on must have its type: a state file edited by hand (or damaged
        # into other valid JSON) is set aside as unreadable, not a traceback at every retry.
        number = (int, float)
        if not (
            isinstance(envelope.id, str)
            and isinstance(envelope.sender, str)
            and isinstance(envelope.created, number)
            and isinstance(envelope.attempts, int)
            and isinstance(envelope.next_attempt, number)
            and all(
                isinstance(r.address, str) and r.status in _STATUSES for r in envelope.recipients
            )
        ):
            raise TypeError("a field of the wrong type")
        times = (envelope.created, envelope.next_attempt, envelope.last_attempt or 0.0)
        if not all(0 <= t < MAX_TIME for t in times):  # (NaN too: no comparison holds)
            raise ValueError("a time out of range")
        return envelope

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        """QueueError if ``raw`` is no envelope."""
        try:
            return cls.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"unreadable envelope: {exc}") from None


def waiting(sender: str, recipients: list[str], message: bytes) -> tuple[Envelope, bytes]:
    """A message the CLI queues (``message`` with CRLF line ends: a DMARC report): its
    envelope, due at once, and its body as a queue stores it (Return-Path first, LF ends)."""
    envelope = Envelope(
        new_queue_id(),
        sender,
        [Recipient(r) for r in recipients],
        time.time(),
        smtputf8=not all(a.isascii() for a in (sender, *recipients)),  # RFC 6531 §3.4
    )
    body = f"Return-Path: <{sender}>\n".encode() + message.replace(b"\r\n", b"\n")
    envelope.size = len(body)
    envelope.wire_size = len(body) + body.count(b"\n")
    return envelope, body


def _report_dict(report: PendingReport) -> dict[str, Any]:
    data = dict(vars(report))
    # Left out when empty: an older node reads the other reports as before. One that does
    # not know the field refuses the message as unreadable rather than misreport the alias.
    if not report.expanded:
        del data["expanded"]
    return data


def _report(data: dict[str, Any]) -> PendingReport:
    report = PendingReport(**data)
    report.expanded = [(alias, orcpt) for alias, orcpt in report.expanded]  # (JSON: lists)
    return report
