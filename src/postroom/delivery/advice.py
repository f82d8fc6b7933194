"""Deliverability advice: what a remote server's refusal means for the admin, in plain words.

A small, ordered table of patterns over the reply text (its enhanced status code, RFC 3463 and
RFC 7372, and the words big providers use): sender authentication (SPF/DKIM/DMARC, 5.7.20 to
5.7.26, or 5.7.1 naming them), missing reverse DNS, a blocklist, TLS required, a full mailbox,
greylisting. The first match gives an :class:`Advice` with the command that helps; anything
else gives None (most refusals are about the recipient, not this server). ``queue show`` and
the human-readable part of a bounce use it. Pure: text in, text out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.wire.replies import status_of


@dataclass(frozen=True, slots=True)
class Advice:
    cause: str  # a short name: sender_auth, reverse_dns, blocklist, tls_required, ...
    text: str  # what it means and what to do, in plain words
    command: str | None  # the command that helps, if one does

    def lines(self) -> list[str]:
        out = [self.text]
        if self.command:
            out.append(f"Run: {self.command}")
        return out


@dataclass(frozen=True, slots=True)
class _Rule:
    cause: str
    status: re.Pattern[str] | None  # on the enhanced status code
    words: re.Pattern[str] | None  # on the text (case-insensitive); both given: both must match
    text: str
    command: str | None


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_AUTH_WORDS = (
    r"\b(spf|dkim|dmarc|unauthenticated|sender (is )?not authenticated|not authorized to send)\b"
)

_TLS_REQUIRED = (
    "The receiving server accepts mail only over an encrypted connection (STARTTLS), and this "
    "delivery was not encrypted. Look in the log for a failed TLS handshake with that host."
)
_MAILBOX_FULL = (
    "The recipient's mailbox is full. Nothing is wrong with this server: let the recipient know "
    "another way. A temporary refusal is retried until max_queue_time."
)

RULES: tuple[_Rule, ...] = (
    _Rule(
        "sender_auth",
        _re(r"^5\.7\.(2[0-4]|26)$"),  # RFC 7372: DKIM, SPF, multiple checks failed
        None,
        "The receiving server wants proof that {domain} allows this server to send its mail "
        "(SPF, DKIM and DMARC records in DNS). Publish the records that 'postroom dns {domain}' "
        "prints, wait for DNS to update, then check them.",
        "postroom dns {domain} --check",
    ),
    _Rule(
        "sender_auth",
        _re(r"^5\.7\.[01]$"),
        _re(_AUTH_WORDS),
        "The receiving server refused the message because it could not verify that {domain} "
        "allows this server to send its mail (SPF, DKIM, DMARC). Publish the records that "
        "'postroom dns {domain}' prints, wait for DNS to update, then check them.",
        "postroom dns {domain} --check",
    ),
    _Rule(
        "reverse_dns",
        None,
        _re(r"(5\.7\.25|\breverse dns\b|\brdns\b|\bptr\b|reverse (lookup|mapping))"),
        "The receiving server wants this server's IP address to have a reverse DNS (PTR) "
        "record that names this server (its hostname), and the hostname to point back to the "
        "address. Ask whoever runs the IP address (the hosting provider) to set the PTR record.",
        None,
    ),
    _Rule(
        "blocklist",
        None,
        _re(
            r"(block ?list|black ?list|listed (at|on|by)\b|spamhaus|spamcop|barracuda|\brbl\b|"
            r"dnsbl|\b[sxp]bl\b|poor reputation|bad reputation)"
        ),
        "The receiving server found this server's IP address on a blocklist. Look the address "
        "up at the list the reply names and follow its removal steps; check also that no "
        "account here sends spam (a stolen password).",
        None,
    ),
    _Rule(
        "tls_verify",
        _re(r"^4\.7\.5$"),
        _re(r"tls required but not offered|\btls with \S+ failed\b"),
        "This server requires a verified TLS connection to the recipient domain's mail servers "
        "([delivery] tls_verify_domains), and the one tried did not offer STARTTLS or its "
        "certificate did not verify. Ask the domain's admin to fix TLS on the host named, or "
        "take the domain out of tls_verify_domains.",
        None,
    ),
    _Rule(
        "tls_required",
        _re(r"^[45]\.7\.1[01]$"),
        None,
        _TLS_REQUIRED,
        None,
    ),
    _Rule(
        "tls_required",
        None,
        _re(r"(starttls|\btls\b|encryption)\b.*\b(required|needed|must)|must .*starttls"),
        _TLS_REQUIRED,
        None,
    ),
    _Rule(
        "mailbox_full",
        _re(r"^[45]\.2\.2$"),
        None,
        _MAILBOX_FULL,
        None,
    ),
    _Rule(
        "mailbox_full",
        None,
        _re(r"(mailbox (is )?full|over ?quota|quota exceeded|exceeded (its|the) quota)"),
        _MAILBOX_FULL,
        None,
    ),
    _Rule(
        "greylisting",
        None,
        _re(r"(gr[ae]ylist)"),
        "The receiving server greylists: it refuses the first attempt from a sender it does "
        "not know yet and accepts a later one. Nothing to fix; the queue retries by itself "
        "(to retry at once: the command below).",
        "postroom queue flush",
    ),
    _Rule(
        "greylisting",
        _re(r"^4\.(7\.1|2\.0)$"),
        _re(r"(try again|later|temporar)"),
        "The receiving server asks to try again later, as greylisting servers do with a "
        "sender they do not know yet. Nothing to fix; the queue retries by itself (to retry at "
        "once: the command below).",
        "postroom queue flush",
    ),
)


def advise(reply: str | None, domain: str) -> Advice | None:
    """The advice for a remote ``reply`` (e.g. ``550 5.7.26 ...``) about mail from ``domain``."""
    if not reply:
        return None
    status = status_of(reply)
    for rule in RULES:
        if rule.status is not None and not rule.status.match(status):
            continue
        if rule.words is not None and not rule.words.search(reply):
            continue
        command = rule.command.format(domain=domain) if rule.command else None
        return Advice(rule.cause, rule.text.format(domain=domain), command)
    return None


def sender_domain(sender: str, hostname: str) -> str:
    """The domain whose DNS records matter for mail from ``sender`` (the host's for ``<>``)."""
    return sender.rpartition("@")[2].lower() if "@" in sender else hostname.lower()
