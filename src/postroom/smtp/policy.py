"""SMTP policy: who may send what to whom, and handing finished messages to the queue.

One :class:`SmtpPolicy` per connection, driven by ``server.py`` with the engine's events. It
decides MAIL (submission needs AUTH, RFC 6409 §4; an authenticated user may only use addresses
they own), RCPT (local domains: existing users, aliases, postmaster, RFC 5321 §4.5.1; other
domains only when authenticated: no open relay), AUTH (SASL over TLS only, with brute-force
throttling), and the end of DATA (header limits, mail loops, then a durable write before 250).
Every refusal, its own and the engine's (limits), is reported with client and reason
(:meth:`SmtpPolicy.refused`).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from postroom import events, sasl
from postroom.address import Address, domain_of, parse_user_address
from postroom.delivery import mime_downgrade
from postroom.delivery.mime_downgrade import starts_with_header_field
from postroom.errors import TemporaryStorageError
from postroom.queue.envelope import Envelope, PendingReport, Recipient, new_queue_id
from postroom.smtp.commands import Mail, Rcpt
from postroom.smtp.server_engine import ServerEngine, ServerFeatures
from postroom.wire import replies
from postroom.wire.replies import Reply

if TYPE_CHECKING:
    from postroom.services import Services
    from postroom.storage.interfaces import MessageDraft

Port = Literal["smtp", "submission", "submissions"]

MAX_RECEIVED = 100  # RFC 5321 §6.3: "normally at least 100" (ours counted); Postfix says 50
# RFC 5322 §4.5: white space may stand before the colon (obsolete syntax a receiver accepts).
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")
_HEADER_FIELD = re.compile(rb"(?im)^(date|message-id|from)[ \t]*:")  # the fields we may add
# A message whose client left before its reply (never sent; the refusal is logged with it).
CLIENT_LEFT = Reply(451, "4.4.2", ("Connection lost before the message was accepted",))
# The stop's deadline came while the message was checked (a slow DNS): not accepted, sent
# again later (RFC 5321 §4.2.1: 451 local error; the session's 421 follows).
CUT_BY_THE_STOP = Reply(451, "4.3.2", ("Server shutting down before the message was checked",))


_date_cache: tuple[int, str] = (0, "")


def _submission_form(data: bytes, leaves: bool) -> bytes:
    """A submission (CRLF) as it is queued: a line in its header section that is no field
    gets the empty line before it (RFC 6409 §8: a submission server may mend what it passes
    on; as Postfix's cleanup does), so that its header is the same to the conversion, the
    signer and every verifier; and mail that leaves is made 7-bit with short lines."""
    stray = mime_downgrade.stray_line(data)
    if stray >= 0:
        data = data[:stray] + b"\r\n" + data[stray:]
    return mime_downgrade.downgrade(data, eight_bit=False) if leaves else data


def _needs_submission_form(data: bytes, leaves: bool) -> bool:
    """Whether :func:`_submission_form` changes ``data`` (LF, as a draft holds it)."""
    return mime_downgrade.stray_line(data, b"\n") >= 0 or (
        leaves and mime_downgrade.needs_downgrade(data, eight_bit=False, line_end=b"\n")
    )


def _rfc5322_date(when: float) -> str:
    """RFC 5322 §3.3 date in UTC, formatted once per second (it is on every message)."""
    global _date_cache
    second = int(when)
    if _date_cache[0] != second:
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _date_cache = (second, email.utils.format_datetime(stamp))
    return _date_cache[1]


_NOTIFY_DEFAULT = frozenset({"FAILURE", "DELAY"})  # no NOTIFY (RFC 3461 §4.1 allows either)


def _asked(notify: list[str] | None) -> frozenset[str]:
    """The notices a RCPT's NOTIFY asks for."""
    return _NOTIFY_DEFAULT if notify is None else frozenset(notify) - {"NEVER"}


def merged_notify(first: list[str] | None, other: list[str] | None) -> list[str] | None:
    """The NOTIFY of one recipient named by two RCPTs: what either asked for (NEVER only if
    both did); ``first`` itself when ``other`` adds nothing."""
    union = _asked(first) | _asked(other)
    if union == _asked(first):
        return first
    return [n for n in ("SUCCESS", "FAILURE", "DELAY") if n in union]


@dataclass
class _Txn:
    sender: Address | None = None
    mail: Mail | None = None
    recipients: list[Recipient] = field(default_factory=list)
    seen: dict[str, Recipient] = field(default_factory=dict)  # by final address
    # Aliases of several addresses named with NOTIFY=SUCCESS, owed an "expanded" DSN: by key
    # (one notice for ``Team@`` and ``team@``), each as RCPT first named it, with its ORCPT.
    expanded: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    draft: MessageDraft | None = None
    queue_id: str = ""
    received_at: float = 0.0
    leaves: bool = False  # a recipient is in another domain (set at DATA: they are final then)


class SmtpPolicy:
    """The policy half of one SMTP connection."""

    def __init__(self, services: Services, port: Port, client_ip: str, tls: bool) -> None:
        self.services = services
        self.cfg = services.cfg
        self.port = port
        self.client_ip = client_ip
        self.tls = tls
        self.auth_user: str | None = None
        self.auth_credential: str | None = None  # what the login proved, as stored then
        self.helo = ""
        self.extended = True  # EHLO, not HELO
        self.txn = _Txn()
        self.tls_version: str | None = None  # set by the glue before the end of a message
        # A finished message is being checked (nothing of it is queued yet: a stop may cut
        # that short, see on_message_end), and whether the stop did.
        self.checking = False
        self.cut_by_the_stop = False

    # -- features ------------------------------------------------------------------------------

    def features(self) -> ServerFeatures:
        tls_ok = self.tls or self.cfg.auth.allow_plaintext
        return ServerFeatures(
            hostname=self.cfg.hostname,
            size_limit=self.cfg.limits.message_size,
            max_recipients=self.cfg.limits.max_recipients,
            max_errors=self.cfg.limits.max_errors,
            max_commands=self.cfg.limits.max_commands,
            starttls=not self.tls and self.services.tls is not None,
            # RFC 4954 §4 / RFC 8314: credentials only over TLS.
            auth_mechanisms=sasl.MECHANISMS if tls_ok else (),
        )

    def tls_started(self, proto: ServerEngine) -> None:
        self.tls = True
        self.auth_user = None
        self.txn = _Txn()
        proto.tls_started(self.features())

    # -- MAIL / RCPT ---------------------------------------------------------------------------

    def reset(self) -> None:
        if self.txn.draft is not None:
            self.txn.draft.abort()
        self.txn = _Txn()

    def refused(
        self, reply: Reply, command: Mail | Rcpt | None = None, txn: _Txn | None = None
    ) -> Reply:
        """Report a refusal of MAIL or RCPT (``command``) or of the message (``txn``, else the
        current one), by the policy or the engine; returns ``reply``."""
        txn = txn or self.txn
        recipient = None
        if isinstance(command, Mail):
            stage, sender = "MAIL", command.sender
        else:
            stage, sender = ("RCPT" if command else "DATA"), txn.sender
            recipient = str(command.recipient) if command else None
        events.refused(
            self.port,
            self.client_ip,
            stage,
            reply,
            sender=str(sender) if sender is not None else "",
            recipient=recipient,
            queue_id=txn.queue_id or None,
            helo=self.helo,
        )
        return reply

    def _store_failed(self, exc: Exception, command: Mail | Rcpt) -> Reply:
        """The account store could not be read now (damaged, say): refused for now, the
        session goes on (it ended, with a traceback, without a reply to QUIT)."""
        events.logger(self.port).error("%s: %s", command.__class__.__name__.upper(), exc)
        return self.refused(replies.LOCAL_ERROR, command)

    def on_mail(self, cmd: Mail) -> Reply:
        self.reset()
        if self.port != "smtp" and self.auth_user is None:
            # RFC 3207 §4: where AUTH needs TLS first, say so.
            plaintext = not (self.tls or self.cfg.auth.allow_plaintext)
            if plaintext and self.services.tls is not None:
                return self.refused(replies.MUST_STARTTLS, cmd)
            return self.refused(replies.AUTH_REQUIRED, cmd)
        try:
            # A login whose account was deleted since (user del), or whose password changed
            # (user passwd; user del and add), sends no more, <> included: taking a stolen
            # account back must stop the thief's open sessions too.
            if self.auth_user is None:
                gone = False
            else:
                now = self.services.accounts.credential(self.auth_user)
                proved = self.auth_credential  # (None: not read at login; then only deletion)
                gone = now is None or (proved is not None and now != proved)
            owned = (
                self.auth_user is None
                or cmd.sender is None
                or self.services.accounts.owns(self.auth_user, cmd.sender.key)
            )
        except TemporaryStorageError as exc:
            return self._store_failed(exc, cmd)
        if gone:
            return self.refused(replies.ACCOUNT_GONE, cmd)
        if not owned:
            return self.refused(replies.SENDER_NOT_OWNED, cmd)
        self.txn = _Txn(sender=cmd.sender, mail=cmd)
        return replies.SENDER_OK

    def on_rcpt(self, cmd: Rcpt) -> Reply:
        addr = cmd.recipient
        if addr.domain == "":
            # RFC 5321 §4.1.1.3: the bare <Postmaster> is this server's postmaster.
            addr = Address("postmaster", self.cfg.domains[0])
        notify = cmd.params.get("NOTIFY")
        notify_list = [n.upper() for n in notify.split(",")] if notify else None
        orcpt = cmd.params.get("ORCPT")
        if self.cfg.is_local_domain(addr.domain):
            key = addr.key
            try:
                targets = self.services.accounts.resolve(key)
            except TemporaryStorageError as exc:
                return self._store_failed(exc, cmd)
            if targets is None:
                return self.refused(replies.USER_UNKNOWN, cmd)
            if not targets:
                return self.refused(replies.ALIAS_LOOP, cmd)
            original = str(addr) if targets != [key] else None
            notify_members = notify_list
            if len(targets) > 1 and notify_list and "SUCCESS" in notify_list:
                # RFC 3461 §6.2.7.3: an alias of several addresses is this recipient's last
                # step: one "expanded" notice for it (none to the null sender, §6.2), and its
                # members get its NOTIFY without SUCCESS, whoever else named them. (An alias
                # of one address is a forward: its NOTIFY goes on whole.)
                notify_members = [n for n in notify_list if n != "SUCCESS"] or ["NEVER"]
                if self.txn.sender is not None:
                    self.txn.expanded.setdefault(key, (str(addr), orcpt))
            for target in targets:
                self._add_recipient(
                    Recipient(target, original=original, orcpt=orcpt, notify=notify_members)
                )
            return replies.RECIPIENT_OK
        if self.auth_user is None:
            return self.refused(replies.RELAY_DENIED, cmd)
        self._add_recipient(Recipient(str(addr), orcpt=orcpt, notify=notify_list))
        return replies.RECIPIENT_OK

    def _add_recipient(self, rcpt: Recipient) -> None:
        """Each final address once per message, however often it was named or reached; it
        gets every notice any of those RCPTs asked for (RFC 3461 §4.1: NOTIFY is per RCPT).
        Its reports name it as the RCPT they answer named it (RFC 3464 §2.3.1: the
        Original-Recipient is that RCPT's): the one that asked for success notices if one
        alone did (failures are asked for by both, unless NEVER), else the one that named
        it directly rather than through an alias."""
        kept = self.txn.seen.get(rcpt.address)
        if kept is None:
            self.txn.seen[rcpt.address] = rcpt
            self.txn.recipients.append(rcpt)
            return
        success = "SUCCESS" in _asked(rcpt.notify)
        if success != ("SUCCESS" in _asked(kept.notify)):
            named_by_new = success
        else:
            named_by_new = kept.original is not None and rcpt.original is None
        kept.notify = merged_notify(kept.notify, rcpt.notify)
        if named_by_new:
            kept.original, kept.orcpt = rcpt.original, rcpt.orcpt

    # -- DATA ----------------------------------------------------------------------------------

    def on_data_start(self) -> None:
        self.txn.queue_id = new_queue_id()
        self.txn.received_at = time.time()
        local = self.cfg.is_local_domain
        self.txn.leaves = not all(local(domain_of(r.address)) for r in self.txn.recipients)
        sender = str(self.txn.sender) if self.txn.sender is not None else ""
        # Bound to this transaction: the prefix may be made at the end of DATA, when the
        # session has moved on to the next one.
        make_prefix = functools.partial(self._prefix, self.txn)
        self.txn.draft = self.services.queue.draft(self.txn.queue_id, sender, make_prefix)

    def on_data(self, data: bytes) -> None:
        assert self.txn.draft is not None
        self.txn.draft.write(data)

    def _protocol_name(self, txn: _Txn) -> str:
        # RFC 3848 (and RFC 6531 §3.7.3 for UTF8) "with" protocol types; plain SMTP after HELO.
        if not (self.extended or self.tls or self.auth_user is not None):
            return "SMTP"
        name = "ESMTP"
        if txn.mail is not None and txn.mail.smtputf8:
            name = "UTF8SMTP"
        if self.tls:
            name += "S"
        if self.auth_user is not None:
            name += "A"
        return name

    def _prefix(self, txn: _Txn, head: bytes) -> bytes:
        """Our Received header, plus From/Date/Message-ID for submissions that leave and lack
        them, plus the blank line that ends the header section when the message has none (its first
        line is no header field: it would otherwise become one). LF line ends, as stored."""
        date = _rfc5322_date(txn.received_at)
        rcpt = ""
        if len(txn.recipients) == 1:
            named = txn.recipients[0].original or txn.recipients[0].address
            # Not a UTF-8 address (RFC 6531 §3.7.3 allows it): that alone would make an ASCII
            # message unfit for a hop without SMTPUTF8 (5.6.9), and "for" is optional.
            rcpt = f"\n\tfor <{named}>" if named.isascii() else ""
        helo = self.helo.replace("\r", "").replace("\n", "")[:255] or "unknown"
        # RFC 5321 §4.1.3: an IPv6 address literal is tagged "IPv6:".
        literal = f"IPv6:{self.client_ip}" if ":" in self.client_ip else self.client_ip
        received = (
            f"Received: from {helo} ([{literal}])\n"
            f"\tby {self.cfg.hostname} (postroom) with {self._protocol_name(txn)}"
            f" id {txn.queue_id}{rcpt};\n\t{date}\n"
        )
        extra = ""
        has_header = bool(head) and not head.startswith(b"\n") and starts_with_header_field(head)
        if self.auth_user is not None and txn.leaves:
            header_end = head.find(b"\n\n")
            # (A message without a header section has none of them, whatever its body says.)
            headers = b"" if not has_header else head if header_end < 0 else head[: header_end + 1]
            present = {m.group(1).lower() for m in _HEADER_FIELD.finditer(headers)}
            # RFC 6409 §8.2-8.3: a submission server may add a missing Date and Message-ID; done
            # only for mail that leaves (receivers refuse mail without them), so mail that stays
            # here is stored as it came.
            if b"date" not in present:
                extra += f"Date: {date}\n"
            if b"message-id" not in present:
                extra += f"Message-ID: <{txn.queue_id}@{self.cfg.hostname}>\n"
            # RFC 5322 §3.6: From is required (mailutils' mail sends none; receivers refuse
            # such mail, and unsigned it fails DMARC): the sender, whom AUTH vouched for.
            if b"from" not in present and txn.sender is not None and str(txn.sender):
                extra += f"From: <{txn.sender}>\n"
        if head and not head.startswith(b"\n") and not has_header:
            extra += "\n"  # RFC 5322 §2.1: the body follows an empty line (Postfix's cleanup)
        return (received + extra).encode("utf-8", "replace")

    def _check_headers(self, head: bytes) -> Reply | None:
        limit = self.cfg.limits.header_size
        # ``head`` has LF line ends; the limit is on the header section as the client sent it,
        # each line with its CRLF (RFC 5322 §2.1), the empty line after it not counted.
        if head.startswith(b"\n"):
            section = b""
        else:
            end = head.find(b"\n\n")
            section = head if end < 0 else head[: end + 1]
        if len(section) + section.count(b"\n") > limit:
            # Only when it looks too large: where the fields really end. A line that is no
            # field and no continuation ends the header section (RFC 5322 §2.1-2.2, as
            # Postfix's cleanup decides): a message without one is all body, not too large.
            section = section[: mime_downgrade.fields_end(section, b"\n")]
            if len(section) + section.count(b"\n") > limit:
                return replies.HEADERS_TOO_BIG
        headers = section[:-1] if section.endswith(b"\n") else section
        if len(_RECEIVED.findall(headers)) >= MAX_RECEIVED:
            return replies.TOO_MANY_HOPS
        return None

    async def on_message_end(self, client_gone: Callable[[], bool] = lambda: False) -> Reply:
        """The message is complete: checked, changed, handed to the queue; the reply to the
        final dot. ``client_gone``: has the client left meanwhile (the checks may wait)?"""
        txn, self.txn = self.txn, _Txn()
        draft = txn.draft
        assert draft is not None
        self.checking = True
        try:
            problem = await self._prepare(txn, draft)
        except Exception:  # a bug, or a message no step foresaw: refused for now, not a crash
            events.logger(self.port).exception(
                "%s: the message could not be prepared", txn.queue_id
            )
            problem = replies.LOCAL_ERROR
        except asyncio.CancelledError:
            if not self.cut_by_the_stop:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # (the cancel was ours, and is done with)
            problem = CUT_BY_THE_STOP
        finally:
            self.checking = False
        if problem is None and client_gone():
            # It never sees a 250, so it sends the message again (RFC 5321 §6.1): queued
            # now, it would be delivered twice. (A client that leaves later is too late.)
            problem = CLIENT_LEFT
        if problem is not None:
            draft.abort()
            return self.refused(problem, txn=txn)
        return await self._hand_off(txn, draft)

    async def _prepare(self, txn: _Txn, draft: MessageDraft) -> Reply | None:
        """The checks and changes before the hand-off; a refusal, or None."""
        problem = self._check_headers(draft.head(self.cfg.limits.header_size + 2))
        received_size = draft.wire_size  # (the conversion below may make it grow threefold)
        if problem is None and self.auth_user is not None:
            # Submitted mail that leaves is made 7-bit with short lines here, before it is
            # signed (RFC 6376 §5.3), so that no relay hop has to convert it and break the
            # signature; mail that stays here is not. A header line that is no field is mended
            # in both (see _submission_form). Our fields are made again from the result.
            await draft.rewrite(
                functools.partial(_submission_form, leaves=txn.leaves),
                functools.partial(_needs_submission_form, leaves=txn.leaves),
            )
        if problem is None and self.services.sender_auth is not None:
            # DKIM signing (submissions) or SPF/DKIM/DMARC and Authentication-Results (MX):
            # the finished message's transform or verdict, before the one hand-off below.
            problem = await self.services.sender_auth.end_of_data(
                draft,
                port=self.port,
                auth_user=self.auth_user,
                client_ip=self.client_ip,
                helo=self.helo,
                sender=str(txn.sender) if txn.sender is not None else "",
                received_size=received_size,
            )
        return problem

    async def _hand_off(self, txn: _Txn, draft: MessageDraft) -> Reply:
        """The message to the queue, in one step: durable, or refused."""
        envelope = Envelope(
            id=txn.queue_id,
            sender=str(txn.sender) if txn.sender is not None else "",
            recipients=txn.recipients,
            created=txn.received_at,
            client_ip=self.client_ip,
            helo=self.helo,
            auth_user=self.auth_user,
            envid=txn.mail.params.get("ENVID") if txn.mail else None,
            ret=(txn.mail.params.get("RET") or "").upper() or None if txn.mail else None,
            smtputf8=bool(txn.mail and txn.mail.smtputf8),
            service=self.port,
            tls_version=self.tls_version,
        )
        if txn.expanded:  # owed from the start, queued by the first attempt (RFC 3461 §6.2.7.3)
            aliases = list(txn.expanded.values())
            report = PendingReport(new_queue_id(), [], [], txn.received_at, aliases)
            envelope.reports.append(report)
        intake = self.services.intake
        assert intake is not None
        result = await intake.accept(envelope, draft)
        if isinstance(result, Reply):
            return self.refused(result, txn=txn)
        return Reply(250, "2.0.0", (f"OK: queued as {result.queue_id}",))

    # -- AUTH ---------------------------------------------------------------------------------

    def authenticated(self, username: str, mechanism: str) -> None:
        """A SASL exchange succeeded (``sasl_session.py`` drove it)."""
        self.auth_user = parse_user_address(username).key
        try:
            self.auth_credential = self.services.accounts.credential(self.auth_user)
        except TemporaryStorageError:
            self.auth_credential = None  # (its next MAIL is refused: logging in again helps)
        events.auth_ok(self.port, self.client_ip, self.auth_user, mechanism)
