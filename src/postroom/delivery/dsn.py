"""Delivery status notifications (RFC 3464, RFC 3461 DSN, RFC 6533 for UTF-8): the bounce builder.

:func:`build_dsn` turns what the queue knows about some recipients of one message into one
``multipart/report; report-type=delivery-status`` message (RFC 6522): a human-readable
text/plain part, the machine-readable message/delivery-status part (per-message fields, then one
block per recipient with Action, Status, Remote-MTA, Diagnostic-Code, ...: ``smtp`` for a
server's reply, ``X-Postroom`` for what postroom found itself), and the original header section
as text/rfc822-headers, or the whole message as message/rfc822 when the sender asked for
RET=FULL on a failure and it is not too large (message/global-headers and message/global, RFC
6533, when the addresses or the header section are in UTF-8). ``From: MAILER-DAEMON@hostname``
and ``Auto-Submitted: auto-replied`` (RFC 3834 §5) mark it as automatic; the caller queues it
with a null reverse-path and must never send one for a message whose own sender was null (RFC
3461 §6.2, RFC 5321 §4.5.5). Pure: no I/O, no clock, no randomness (times and the Message-ID
come in or are derived from the input). Security notes: every value that came from the network
(remote replies, addresses, ENVID, the original headers) has its CR, LF and control characters
removed before it becomes a header field, so a hostile server cannot inject fields or MIME
parts, and the boundary is checked against the content. Output lines end in CRLF.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import textwrap
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

from postroom.delivery.advice import advise, sender_domain
from postroom.wire.replies import STATUS_CODE, status_of

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

# RFC 3461 §4.3 leaves the size of a returned message to the MTA; Postfix returns 50 kB.
DEFAULT_FULL_LIMIT = 256 * 1024
MAX_HEADER_COPY = 64 * 1024
MAX_WORD = 900  # octets of one unbreakable word in a report line
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_XTEXT_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")
_REPLY_CODES = re.compile(r"^(?:[2-5]\d\d[ -])?(?:[245]\.\d{1,3}\.\d{1,3}(?:\s+|$))?")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """What to report for one recipient (RFC 3464 §2.3)."""

    final_recipient: str  # the address we tried to deliver to
    action: Action
    status: str  # RFC 3463 code, for example "5.1.1"
    original_recipient: str | None = None  # the ORCPT value as received, "rfc822;xtext"
    remote_mta: str | None = None  # the host name of the server that gave the reply
    # The server's reply ("550 5.1.1 no such user"), or, without remote_mta, what postroom
    # itself found ("553 5.6.7 mx.b.test[192.0.2.1]: the server does not offer SMTPUTF8 ...").
    diagnostic: str | None = None
    last_attempt: _dt.datetime | float | None = None
    will_retry_until: _dt.datetime | float | None = None  # for "delayed"


def failure_status(reply: str) -> str:
    """The Status (RFC 3463) of a recipient that failed with ``reply``, as the queue keeps it
    (``550 5.1.1 text``, ``451 4.4.1 text``, or a bare ``4.4.7 text``): its own enhanced code
    (:func:`~postroom.wire.replies.status_of`: never one read out of an address in the
    text), else 5.0.0 for a refusal; a temporary error that gave out at ``max_queue_time``
    keeps its code, or gets 4.4.7 (delivery time expired)."""
    status = status_of(reply)
    if status[:1] in ("4", "5"):  # (status_of reads only codes RFC 3463 §2 allows)
        return status
    return "5.0.0" if reply.strip()[:1] in ("2", "5") else "4.4.7"


def xtext_decode(value: str) -> str:
    """Undo RFC 3461 §4 xtext ("+2B" -> "+"). Each "+XX" is an octet, so escaped UTF-8
    ("+C3+BC") is read back as UTF-8; octets that are no UTF-8 become U+FFFD, which the
    field writer then shows as it shows any other non-ASCII character."""
    raw = _XTEXT_HEX.sub(lambda m: bytes.fromhex(m.group(1).decode()), value.encode())
    return raw.decode("utf-8", "replace")


def xtext_encode(value: str) -> str:
    """RFC 3461 §4 xtext of ``value`` (its UTF-8 octets): "+" and "=" and every octet outside
    "!".."~" become "+XX". For an address we name ourselves, as the sender's ORCPT would."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def format_date(when: _dt.datetime | float) -> str:
    """RFC 5322 §3.3 date-time, always in English (strftime's %a follows the locale)."""
    t = _as_datetime(when)
    off = t.utcoffset() or _dt.timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (
        f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


def _as_datetime(when: _dt.datetime | float) -> _dt.datetime:
    if isinstance(when, _dt.datetime):
        return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)
    return _dt.datetime.fromtimestamp(when, _dt.UTC)


def _clean(value: str, *, utf8: bool) -> str:
    """One header-safe line: no CR, LF or other controls; non-ASCII only when allowed."""
    value = _CONTROL.sub(" ", value).strip()
    if not utf8 and not value.isascii():
        value = value.encode("ascii", "replace").decode("ascii")
    return value


def _own_words(diagnostic: str, *, utf8: bool) -> str:
    """A reply of postroom's own without its codes (the Status field carries them)."""
    return _REPLY_CODES.sub("", _clean(diagnostic, utf8=utf8), count=1)


def _short_word(word: str) -> str:
    """``word`` cut to :data:`MAX_WORD` octets: a word is never folded, and a line may not
    pass 998 octets (RFC 5322 §2.1.1); a peer's reply may hold a longer one."""
    raw = word.encode("utf-8")
    if len(raw) <= MAX_WORD:
        return word
    return raw[:MAX_WORD].decode("utf-8", "ignore") + "..."


def _field(name: str, value: str, *, utf8: bool) -> str:
    """``Name: value`` folded at spaces so that lines stay short (RFC 5322 §2.2.3)."""
    words = [_short_word(w) for w in _clean(value, utf8=utf8).split(" ")]
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > 76 and current != f"{name}:":
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


def _address_field(name: str, address: str, utf8: bool) -> str:
    """``Final-Recipient: rfc822; a@b`` or ``utf-8; ...`` for an internationalised address."""
    addr_type = "rfc822" if address.isascii() else "utf-8"  # RFC 6533 §3
    return _field(name, f"{addr_type}; {address}", utf8=utf8)


def _split_message(original: bytes) -> tuple[bytes, bytes]:
    """The header section (with CRLF line ends, no blank line) and the body of ``original``."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = original.find(sep)
        if end >= 0:
            head, body = original[:end], original[end + len(sep) :]
            break
    else:
        head, body = original, b""
    head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return head, body


def _header_value(head: bytes, name: bytes) -> str | None:
    pattern = re.compile(rb"(?im)^" + re.escape(name) + rb":[ \t]*(.*(?:\r\n[ \t].*)*)")
    m = pattern.search(head)
    if m is None:
        return None
    return m.group(1).decode("utf-8", "replace").replace("\r\n", " ").strip()


def _subject(actions: AbstractSet[str]) -> str:
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(
        " ".join(_short_word(w) for w in text.split(" ")),
        76,
        initial_indent="    ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _human_part(hostname: str, recipients: Sequence[DsnRecipient], utf8: bool, domain: str) -> str:
    actions = {r.action for r in recipients}
    out = [f"This is the mail system at host {hostname}.", ""]
    if "failed" in actions:
        out += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The details follow.",
        ]
    if "delayed" in actions:
        out += [
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried; you do not need to send it again.",
        ]
    if actions & {"delivered", "relayed", "expanded"}:
        out += ["Your message was delivered to (or handed on for) the recipients listed below."]
    out.append("")
    for r in recipients:
        line = f"<{_clean(r.final_recipient, utf8=utf8)}>: {r.action} ({r.status})"
        out.append(line)
        if r.action == "failed" and r.status.startswith("4"):  # temporary errors until the end
            out += _wrap(
                "I gave up: it could not be delivered within the time this server keeps mail"
                " in its queue. The last attempt ended with this error:"
            )
        if r.remote_mta:
            said = _clean(r.diagnostic or "", utf8=utf8)
            host = _clean(r.remote_mta, utf8=utf8)
            text = f"host {host} said: {said}" if said else f"host {host} took it"
        else:
            text = _own_words(r.diagnostic or "", utf8=utf8)
        if text:
            out += _wrap(text)
        hint = advise(r.diagnostic, domain) if r.action in ("failed", "delayed") else None
        if hint is not None and hint.cause == "greylisting" and r.action == "failed":
            hint = None  # "the queue retries by itself": not once it has given up
        if hint is not None:  # a cause this server's admin can fix, in plain words
            out += ["", *_wrap("What this means: " + hint.text)]
            if hint.command:
                out += _wrap(f"The admin of {hostname} can run: {hint.command}")
    out.append("")
    return "\r\n".join(out) + "\r\n"


def _status_part(
    hostname: str,
    recipients: Sequence[DsnRecipient],
    *,
    envid: str | None,
    arrival: _dt.datetime | float,
    queue_id: str | None,
    utf8: bool,
) -> str:
    # RFC 3464 §2.2: per-message fields in its order (Original-Envelope-Id, Reporting-MTA,
    # Arrival-Date, then extension fields), a blank line before each per-recipient block.
    out = ""
    if envid:
        # RFC 3464 §2.2.1: the ENVID, decoded from xtext.
        out += _field("Original-Envelope-Id", xtext_decode(envid), utf8=utf8)
    out += _field("Reporting-MTA", f"dns; {hostname}", utf8=utf8)
    out += _field("Arrival-Date", format_date(arrival), utf8=utf8)
    if queue_id:
        out += _field("X-Postroom-Queue-ID", queue_id, utf8=utf8)
    for r in recipients:
        if not STATUS_CODE.fullmatch(r.status):
            raise ValueError(f"bad status code {r.status!r}")  # our own bug, not the peer's
        out += "\r\n"
        if r.original_recipient and ";" in r.original_recipient:
            # RFC 3464 §2.3.1: the ORCPT address type and its xtext-decoded value.
            kind, _, value = r.original_recipient.partition(";")
            out += _field("Original-Recipient", f"{kind.strip()}; {xtext_decode(value)}", utf8=utf8)
        out += _address_field("Final-Recipient", r.final_recipient, utf8)
        out += _field("Action", r.action, utf8=utf8)
        out += _field("Status", r.status, utf8=utf8)
        # RFC 3464 §2.3.5-2.3.6: Remote-MTA and an "smtp" diagnostic only for a reply a server
        # sent; what postroom found itself is told in its own words, with its own type.
        if r.remote_mta:
            out += _field("Remote-MTA", f"dns; {r.remote_mta}", utf8=utf8)
            if r.diagnostic:
                out += _field("Diagnostic-Code", f"smtp; {r.diagnostic}", utf8=utf8)
        elif r.diagnostic and (words := _own_words(r.diagnostic, utf8=utf8)):
            out += _field("Diagnostic-Code", f"X-Postroom; {words}", utf8=utf8)
        if r.last_attempt is not None:
            out += _field("Last-Attempt-Date", format_date(r.last_attempt), utf8=utf8)
        if r.will_retry_until is not None and r.action == "delayed":
            out += _field("Will-Retry-Until", format_date(r.will_retry_until), utf8=utf8)
    return out


def build_dsn(
    *,
    hostname: str,
    sender: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival: _dt.datetime | float,
    now: _dt.datetime | float,
    envid: str | None = None,
    ret: str | None = None,
    queue_id: str | None = None,
    message_id: str | None = None,
    full_limit: int = DEFAULT_FULL_LIMIT,
) -> bytes:
    """The complete bounce (or delay/success report) for ``recipients`` of one message.

    ``sender`` is the original envelope sender (the report's To:); it must not be empty.
    ``original`` is the original message as queued. ``envid``/``ret`` are the sender's RFC 3461
    ENVID (xtext) and RET values. The result is ready to be queued with the null sender; it
    contains 8-bit octets only if the original headers (or the returned message) did.
    """
    if not sender:
        raise ValueError("never send a DSN to the null sender (RFC 3461 §6.2)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    # (An original recipient counts as it reads once its xtext is undone: "+C3+B6" is "ö".)
    utf8 = not sender.isascii() or any(
        not r.final_recipient.isascii() or not xtext_decode(r.original_recipient or "").isascii()
        for r in recipients
    )
    actions = {r.action for r in recipients}
    head, _ = _split_message(original)
    full = (
        (ret or "").upper() == "FULL"
        and "failed" in actions  # RFC 3461 §4.3: the full message only with a failure report
        and len(original) <= full_limit
    )
    when = _as_datetime(now)
    if message_id is None:
        digest = hashlib.sha256()
        for piece in (hostname, sender, format_date(when), str(when.microsecond), queue_id or ""):
            digest.update(piece.encode() + b"\0")
        for r in recipients:
            digest.update(f"{r.final_recipient}\0{r.action}\0{r.status}\0".encode())
        digest.update(head)
        message_id = f"{digest.hexdigest()[:32]}@{hostname}"

    domain = sender_domain(sender, hostname)
    human = _human_part(hostname, recipients, utf8, domain).encode("utf-8")
    status = _status_part(
        hostname, recipients, envid=envid, arrival=arrival, queue_id=queue_id, utf8=utf8
    ).encode("utf-8")
    # RFC 6533 §3, RFC 6532 §3.7: a header section in UTF-8 goes back as message/global(-headers),
    # never as the 7-bit text/rfc822-headers or message/rfc822, whatever the addresses are.
    global_types = utf8 or not head.isascii()
    if full:
        returned = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        returned_type = "message/global" if global_types else "message/rfc822"
    else:
        returned = head[:MAX_HEADER_COPY]
        if len(head) > MAX_HEADER_COPY:
            returned = returned[: returned.rfind(b"\r\n")]
        returned += b"\r\n"
        returned_type = "message/global-headers" if global_types else "text/rfc822-headers"

    seed = hashlib.sha256(message_id.encode()).hexdigest()[:24]
    counter = 0
    boundary = f"=_postroom_{seed}"
    while any(boundary.encode() in part for part in (human, status, returned)):
        counter += 1
        boundary = f"=_postroom_{seed}_{counter}"

    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    orig_id = _header_value(head, b"Message-ID")
    lines = [
        _field("From", f"MAILER-DAEMON@{hostname}", utf8=utf8),  # the documented bounce sender
        _field("To", f"<{sender}>", utf8=utf8),
        _field("Subject", _subject(actions), utf8=utf8),
        _field("Date", format_date(when), utf8=utf8),
        _field("Message-ID", f"<{message_id}>", utf8=utf8),
    ]
    if orig_id and re.fullmatch(r"<[^<>\s]+>", orig_id):
        lines.append(_field("In-Reply-To", orig_id, utf8=utf8))
        lines.append(_field("References", orig_id, utf8=utf8))
    lines += [
        "Auto-Submitted: auto-replied\r\n",  # RFC 3834 §5.1
        "MIME-Version: 1.0\r\n",
        # RFC 6522 §3: report-type names the second part's subtype (RFC 6533 §6.3).
        f"Content-Type: multipart/report; report-type={status_type.partition('/')[2]};\r\n"
        f'\tboundary="{boundary}"\r\n',
        "\r\n",
        "This is a MIME-encapsulated message.\r\n",
        "\r\n",
    ]
    charset = "utf-8" if utf8 else "us-ascii"
    cte = "7bit" if returned.isascii() else "8bit"
    out = "".join(lines).encode("utf-8")
    out += (
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}\r\n"
        "\r\n"
    ).encode()
    out += human
    out += (
        f"\r\n--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        f"Content-Type: {status_type}\r\n"
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}\r\n"
        "\r\n"
    ).encode()
    out += status
    out += (
        f"\r\n--{boundary}\r\n"
        f"Content-Description: {'Undelivered message' if full else 'Message headers'}\r\n"
        f"Content-Type: {returned_type}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n"
        "\r\n"
    ).encode()
    out += returned
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode()
    return out
