"""The events postroom reports: one function per event, which counts it and logs it.

This is the one vocabulary of what an admin sees: the metrics (``metrics.py``) and the log lines
(``logs.py``) of an event are made here, side by side, so that they cannot drift apart. The
servers, the queue runner and the delivery code call these functions and nothing else to
report.

Text lines follow Postfix's shapes, so that pflogsumm-style tools read them: the queue id first
(``NOQUEUE`` before there is one), ``QID: client=...`` when a message is accepted (with the
``QID: from=<...>, size=N, nrcpt=N`` line of the queue manager), ``QID: to=<...>, relay=...,
delay=..., dsn=..., status=sent|deferred|bounced (reply)`` per recipient and attempt,
``NOQUEUE: reject: RCPT from [ip]: 550 5.1.1 <...>: ...; from=<...> to=<...>``, ``warning:`` on
failed logins. JSON lines carry the same facts as fields (``accepted`` and ``delivery`` with the
keys docs/operations.md lists). Security: no function here takes a password, a SASL payload or
message content; values that come from the network reach text lines only through ``logs.py``, which
replaces control characters (no forged lines).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom import logs
from postroom.logs import INFO, WARNING, Fields
from postroom.metrics import Exporter, Metrics, always_up
from postroom.wire import replies
from postroom.wire.replies import Reply

if TYPE_CHECKING:
    from postroom.queue.envelope import Envelope, Recipient

_metrics = Metrics(None)
_exporter: Exporter | None = None
_children: dict[tuple[Any, ...], Any] = {}
_on = False  # metrics are kept only when something can read them (an http listener)
_shared = False  # several workers: changes are written to the shared files at once
# Changes not yet handed to prometheus-client: adding to a dict costs a tenth of an update of
# its values (a lock, checks, a write into a memory-mapped file with several workers).
_pending: dict[tuple[Any, ...], float] = {}
_observed: list[tuple[tuple[Any, ...], float]] = []
_flush_soon = False

# Postfix's program names, which pflogsumm keys on (submission/smtpd is how Postfix's
# master.cf names the submission service's smtpd).
_SMTPD = {"smtp": "smtpd", "submission": "submission/smtpd", "submissions": "smtps/smtpd"}


def setup(
    *,
    enabled: bool,
    multiprocess_dir: Path | None,
    data_dir: Path,
    services: Sequence[str],
    spool: Callable[[], tuple[int, float | None]],
    storage_up: Callable[[], bool] = always_up,
) -> None:
    """Make this process's metrics (a worker, after the fork and the drop of root). Without
    ``enabled`` (no http listener) nothing is counted."""
    global _metrics, _exporter, _on, _shared
    from postroom import metrics

    _metrics, _exporter = metrics.build(multiprocess_dir, data_dir, spool, storage_up)
    _children.clear()
    _pending.clear()
    _observed.clear()
    _on, _shared = enabled, multiprocess_dir is not None
    _metrics.prime(services)
    _metrics.start_time.set(time.time())


def exposition() -> bytes:
    """The body of ``GET /metrics``."""
    flush_metrics()
    return _exporter.render() if _exporter is not None else b""


def _count(amount: float, metric: Any, *labels: str) -> None:
    """Add ``amount`` to a counter or gauge child (negative for a gauge going down)."""
    if not _on:
        return
    key = (metric, *labels)
    _pending[key] = _pending.get(key, 0) + amount
    if _shared:
        _schedule_flush()


def _observe(value: float, metric: Any, *labels: str) -> None:
    if not _on:
        return
    _observed.append(((metric, *labels), value))
    if _shared or len(_observed) >= 1024:
        _schedule_flush()


FLUSH_DELAY = 0.01  # several workers: changes reach the shared files within this many seconds
SCRAPE_DELAY = 5 * FLUSH_DELAY  # and a scrape waits this long, so that it sees them all


def _schedule_flush() -> None:
    """With several workers another one may answer the next scrape: the changes are written
    to the shared files :data:`FLUSH_DELAY` after the first of them (a batch, so that a busy
    worker writes each value once per batch, not once per message)."""
    global _flush_soon
    if _flush_soon:
        return
    try:
        asyncio.get_running_loop().call_later(FLUSH_DELAY, flush_metrics)
    except RuntimeError:  # no event loop (a command, a test): at once
        flush_metrics()
        return
    _flush_soon = True


def scrape_delay() -> float:
    """How long ``GET /metrics`` waits before it reads (every worker's batch is written)."""
    return SCRAPE_DELAY if _shared else 0.0


def flush_metrics() -> None:
    """Hand the pending changes to prometheus-client."""
    global _flush_soon
    _flush_soon = False
    while _pending:
        key, amount = _pending.popitem()
        _child(*key).inc(amount)
    observed = _observed[:]
    del _observed[: len(observed)]
    batches: dict[tuple[Any, ...], list[float]] = {}
    for key, value in observed:
        batches.setdefault(key, []).append(value)
    for key, values in batches.items():
        _observe_many(_child(*key), values)


def _observe_many(child: Any, values: list[float]) -> None:
    """``child.observe(v)`` for each value, with each bucket and the sum written once: what
    prometheus-client's Histogram.observe does, batched (one write per value into the shared
    file would cost more than the rest of a message's metrics)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another version: one by one
        for value in values:
            child.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    total.inc(sum(values))


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(...)``, remembered."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels) if labels else metric
    return child


def component(service: str) -> str:
    """The component that names ``service``'s lines (Postfix's names for the SMTP ones)."""
    return _SMTPD.get(service, service)


def logger(service: str) -> logging.Logger:
    """The logger of a session's own lines (``postroom/smtpd[PID]``, as its events)."""
    return logging.getLogger("postroom." + component(service).replace("/", "."))


# -- start-up ------------------------------------------------------------------------------------


def startup(message: str, level: int = INFO) -> None:
    """A start-up line (``postroom: ...``, in JSON too: scripts wait for ``postroom: ready``),
    written at once, whatever ``log_level`` says (there are a handful per start)."""
    prefix = "postroom: "
    if level >= WARNING:
        prefix += "error: " if level >= logs.ERROR else "warning: "
    logs.emit(level, "startup", None, {"message": prefix + message}, _text_message, always=True)
    logs.flush()


def note(component: str, message: str, level: int = INFO) -> None:
    """A line about the server itself (reload, shutdown): ``event = "server"``."""
    logs.emit(level, "server", component, {"message": message}, _text_message)


def _text_message(f: Fields) -> str:
    return str(f["message"])


def certificate(expires: float) -> None:
    """The server certificate was loaded; it expires at ``expires`` (Unix time)."""
    _metrics.cert_expiry.set(expires)


# -- connections -----------------------------------------------------------------------------------


def connected(service: str, client: str) -> None:
    if service in _SMTPD:
        _count(1, _metrics.smtp_connections, service)
    else:
        _count(1, _metrics.pop3_sessions, service)
    _count(1, _metrics.sessions_open, service)
    if logs.enabled(INFO):
        fields = {"service": service, "client": client}
        logs.emit(INFO, "connect", component(service), fields, _text_connect)


def _text_connect(f: Fields) -> str:
    return f"connect from [{f['client']}] service={f['service']}"


def disconnected(
    service: str, client: str, received: int, sent: int, seconds: float, lost_after: str = ""
) -> None:
    """The end of a session; ``lost_after``: the state the client left it in without ending
    it (QUIT, or the server's last reply), as Postfix's "lost connection after DATA"."""
    _count(-1, _metrics.sessions_open, service)
    _count(received, _metrics.bytes_received, service)
    _count(sent, _metrics.bytes_sent, service)
    if logs.enabled(INFO):
        fields = {
            "service": service,
            "client": client,
            "bytes_in": received,
            "bytes_out": sent,
            "duration_s": round(seconds, 3),
        }
        if lost_after:
            fields["lost_after"] = lost_after
        logs.emit(INFO, "disconnect", component(service), fields, _text_disconnect)


def _text_disconnect(f: Fields) -> str:
    return (
        f"disconnect from [{f['client']}] service={f['service']} in={f['bytes_in']}"
        f" out={f['bytes_out']} time={f['duration_s']}"
        + (f" lost_after={f['lost_after']}" if "lost_after" in f else "")
    )


# A client refused unchecked (locked out, over its connection limit) may come back at once,
# thousands of times a second: its refusals are all counted, but logged once per
# REPEAT_INTERVAL (per client and kind), the line saying how many it stands for.
REPEAT_INTERVAL = 10.0
_REPEATS_KEPT = 4096
_repeats: dict[tuple[str, str], tuple[float, int]] = {}


def _unrepeated(kind: str, client: str) -> int | None:
    """None to leave this refusal out of the log; else how many were left out before it."""
    now = time.monotonic()
    key = (kind, client)
    last = _repeats.get(key)
    if last is not None and now - last[0] < REPEAT_INTERVAL:
        _repeats[key] = (last[0], last[1] + 1)
        return None
    _repeats.pop(key, None)  # (re-inserted last: the table is oldest first)
    while len(_repeats) >= _REPEATS_KEPT:  # the oldest go, not all (a re-probe: a flood from
        del _repeats[next(iter(_repeats))]  # more clients than this was logged line by line)
    _repeats[key] = (now, 0)
    return 0 if last is None else last[1]


def connection_refused(service: str, client: str, reason: str) -> None:
    """Turned away at connect: ``connection_limit`` or ``stopping``."""
    fields: dict[str, object] = {"service": service, "client": client, "reason": reason}
    if reason == "connection_limit":
        _count(1, _metrics.throttled, service, reason)
        repeated = _unrepeated("connection_limit", client)
        if repeated is None:
            return
        if repeated:
            fields["repeated"] = repeated
    logs.emit(WARNING, "connection_refused", component(service), fields, _text_conn_refused)


def _text_conn_refused(f: Fields) -> str:
    return (
        f"refused connection from [{f['client']}] service={f['service']}: {f['reason']}"
        + _text_repeated(f)
    )


def _text_repeated(f: Fields) -> str:
    n = f.get("repeated")
    return f" (and {n} more like it in the last {REPEAT_INTERVAL:g}s)" if n else ""


def tls_handshake(service: str, client: str, version: str | None, error: str | None) -> None:
    """A TLS handshake (STARTTLS/STLS, an implicit-TLS port, or a delivery) ended."""
    outcome = "ok" if error is None else "failed"
    _count(1, _metrics.tls_handshakes, service, version or "", outcome)
    if error is not None:
        fields = {"service": service, "client": client, "error": error}
        logs.emit(INFO, "tls_failed", component(service), fields, _text_tls_failed)


def _text_tls_failed(f: Fields) -> str:
    return f"TLS handshake with [{f['client']}] failed: {f['error']}"


def tls_broken(service: str, client: str, error: str) -> None:
    """A TLS session broke after its handshake (a bad record, a renegotiation refused): not
    a failed handshake (``tls_failed``), which scripts may count or act upon."""
    if logs.enabled(INFO):
        fields = {"service": service, "client": client, "error": error}
        logs.emit(INFO, "tls_broken", component(service), fields, _text_tls_broken)


def _text_tls_broken(f: Fields) -> str:
    return f"TLS with [{f['client']}] failed after the handshake: {f['error']}"


# -- SMTP --------------------------------------------------------------------------------------


def accepted(envelope: Envelope) -> None:
    """A message from a client is durable (its 250 goes out next): the server's now."""
    service = envelope.service
    _count(1, _metrics.smtp_messages, service, "accepted")
    if not logs.enabled(INFO):
        return
    fields: dict[str, object] = {
        "queue_id": envelope.id,
        "sender": envelope.sender,
        "recipients": [r.address for r in envelope.recipients],
        "size": envelope.wire_size or envelope.size,
        "client": envelope.client_ip,
        "service": service,
    }
    if envelope.auth_user is not None:
        fields["user"] = envelope.auth_user
    fields["tls"] = envelope.tls_version or "none"  # (as delivery and pop3_login have it)
    logs.emit(INFO, "accepted", component(service), fields, _text_accepted)


def _text_accepted(f: Fields) -> tuple[str, str]:
    user = f", sasl_username={f['user']}" if "user" in f else ""
    recipients: list[str] = f["recipients"]  # type: ignore[assignment]
    rcpts = ",".join(f"<{r}>" for r in recipients)
    return (
        f"{f['queue_id']}: client=[{f['client']}]{user}, tls={f['tls']}"
        f", service={f['service']}, from=<{f['sender']}>, to={rcpts}, size={f['size']}",
        f"@qmgr {f['queue_id']}: from=<{f['sender']}>, size={f['size']}"
        f", nrcpt={len(recipients)} (queue active)",
    )


_REASONS: dict[Reply, str] = {
    replies.USER_UNKNOWN: "user_unknown",
    replies.RELAY_DENIED: "relay_denied",
    replies.SENDER_NOT_OWNED: "sender_not_owned",
    replies.AUTH_REQUIRED: "auth_required",
    replies.ALIAS_LOOP: "alias_loop",
    replies.MESSAGE_TOO_BIG: "size",
    replies.HEADERS_TOO_BIG: "size",
    replies.TOO_MANY_HOPS: "mail_loop",
    replies.BARE_LF_DATA: "bare_lf",
    replies.STORAGE_FULL: "disk_full",
    replies.STORAGE_AWAY: "storage_unavailable",
    replies.TOO_MANY_RECIPIENTS: "too_many_recipients",
}


def refusal_reason(reply: Reply) -> str:
    """A short name for a refusal, for the metric label (a small, fixed set)."""
    reason = _REASONS.get(reply)
    if reason is not None:
        return reason
    if "dmarc" in reply.text.lower():
        return "dmarc"
    return "other"


def refused(
    service: str,
    client: str,
    stage: str,
    reply: Reply,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    queue_id: str | None = None,
    helo: str = "",
) -> None:
    """A MAIL, RCPT or DATA refused by policy or a limit (``stage``: MAIL, RCPT, DATA)."""
    reason = refusal_reason(reply)
    _count(1, _metrics.smtp_messages, service, "rejected")
    _count(1, _metrics.refusals, service, reason)
    if reason == "disk_full":
        _count(1, _metrics.disk_full, service)
    if not logs.enabled(INFO):
        return
    fields: dict[str, object] = {
        "queue_id": queue_id,
        "service": service,
        "client": client,
        "stage": stage,
        "reason": reason,
        "reply": str(reply),
        "sender": sender,
        "recipient": recipient,
        "helo": helo[:255],
    }
    logs.emit(INFO, "reject", component(service), fields, _text_refused)


def _text_refused(f: Fields) -> str:
    text = str(f["reply"])
    if f["recipient"] is not None and f["stage"] == "RCPT":
        code, _, rest = text.partition(" ")
        status, _, words = rest.partition(" ")
        text = f"{code} {status} <{f['recipient']}>: {words}"
    sender = "" if f["sender"] is None else f"from=<{f['sender']}> "
    rcpt = "" if f["recipient"] is None else f"to=<{f['recipient']}> "
    return (
        f"{f['queue_id'] or 'NOQUEUE'}: reject: {f['stage']} from [{f['client']}]: {text}; "
        f"{sender}{rcpt}service={f['service']} reason={f['reason']} helo=<{f['helo']}>"
    )


def auth_ok(service: str, client: str, user: str, mechanism: str) -> None:
    if logs.enabled(INFO):
        fields = {"service": service, "client": client, "user": user, "mechanism": mechanism}
        logs.emit(INFO, "auth", component(service), fields, _text_auth_ok)


def _text_auth_ok(f: Fields) -> str:
    return (
        f"[{f['client']}]: {f['mechanism']} authentication ok, sasl_username={f['user']},"
        f" service={f['service']}"
    )


def auth_failed(service: str, client: str, user: str | None, mechanism: str) -> None:
    """A failed login; ``user`` is the name tried (never the password)."""
    _count(1, _metrics.auth_failures, service)
    fields = {
        "service": service,
        "client": client,
        "user": (user or "")[:256],
        "mechanism": mechanism,
    }
    logs.emit(WARNING, "auth_failed", component(service), fields, _text_auth_failed)


def _text_auth_failed(f: Fields) -> str:
    return (
        f"[{f['client']}]: {f['mechanism']} authentication failed, sasl_username={f['user']},"
        f" service={f['service']}"
    )


def login_throttled(service: str, client: str) -> None:
    """A login refused unchecked: the client failed too often (the throttle's lockout)."""
    _count(1, _metrics.throttled, service, "login_lockout")
    repeated = _unrepeated("login_lockout", client)
    if repeated is None:
        return
    fields: dict[str, object] = {"service": service, "client": client}
    if repeated:
        fields["repeated"] = repeated
    logs.emit(WARNING, "login_throttled", component(service), fields, _text_throttled)


def _text_throttled(f: Fields) -> str:
    return (
        f"[{f['client']}]: login refused: too many failed logins, service={f['service']}"
        + _text_repeated(f)
    )


def pop3_login(
    service: str, client: str, user: str, messages: int, mechanism: str, tls: str | None
) -> None:
    """A POP3 login: ``mechanism`` is ``USER`` for USER/PASS, ``tls`` the TLS version or None."""
    if logs.enabled(INFO):
        fields = {
            "service": service,
            "client": client,
            "user": user,
            "messages": messages,
            "mechanism": mechanism,
            "tls": tls,
        }
        logs.emit(INFO, "pop3_login", component(service), fields, _text_pop3_login)


def pop3_in_use(service: str, client: str, user: str) -> None:
    """A right login refused because another session holds the maildrop (``[IN-USE]``)."""
    if logs.enabled(INFO):
        fields = {"service": service, "client": client, "user": user}
        logs.emit(INFO, "pop3_in_use", component(service), fields, _text_pop3_in_use)


def _text_pop3_in_use(f: Fields) -> str:
    return (
        f"login refused: user={f['user']}, client=[{f['client']}], service={f['service']}:"
        " mailbox in use by another session"
    )


def _text_pop3_login(f: Fields) -> str:
    return (
        f"login: user={f['user']}, client=[{f['client']}], service={f['service']},"
        f" messages={f['messages']}, method={f['mechanism']}, tls={f['tls'] or 'none'}"
    )


# -- delivery ----------------------------------------------------------------------------------


def delivery(
    envelope: Envelope,
    rcpt: Recipient,
    transport: str,
    reply: str,
    relay: str,
    seconds: float,
    mailbox: str | None = None,
    tls: str | None = None,
) -> None:
    """One attempt for one recipient ended, ``rcpt.status`` says how: delivered, deferred or
    bounced. ``relay`` is ``host[ip]:port``, ``local`` or ``none`` (no host was reached),
    ``seconds`` how long the attempt took; the line's ``delay`` counts from the arrival.
    ``tls``: the version and cipher of the remote session that gave ``reply``, ``none`` for
    a plaintext one; None when no session was made (no host reached, no connection, a line
    of the queue's own such as an expiry, a local delivery): the line has no ``tls`` then.
    """
    status = rcpt.status
    _count(1, _metrics.deliveries, transport, status)
    _observe(seconds, _metrics.attempt_seconds, transport, status)
    if not logs.enabled(INFO):
        return
    # The code of what was done, as the DSN says it: a 5xx we retry (552 at RCPT, RFC 5321
    # §4.5.3.1.10) is logged 4.x.x; a refusal whose code disagrees with its class, 5.0.0.
    status_code = replies.status_of(reply)
    if status == "delivered" and status_code[:1] != "2":
        status_code = "2.0.0"
    elif status == "deferred" and status_code[:1] != "4":
        status_code = "4" + status_code[1:] if status_code else "4.0.0"
    elif status == "bounced" and status_code[:1] not in ("4", "5"):  # 4: it expired
        status_code = "5.0.0"
    fields: dict[str, object] = {
        "queue_id": envelope.id,
        "recipient": rcpt.address,
        "transport": transport,
        "status": status,
        "dsn": status_code,
        "relay": relay,
        "delay_s": round(max(0.0, time.time() - envelope.created), 3),
        "reply": reply,
    }
    if rcpt.original is not None:
        fields["orig_to"] = rcpt.original
    if mailbox is not None:
        fields["mailbox"] = mailbox
    if tls is not None:
        fields["tls"] = tls
    logs.emit(INFO, "delivery", "local" if transport == "local" else "smtp", fields, _text_delivery)


_POSTFIX_STATUS = {"delivered": "sent", "deferred": "deferred", "bounced": "bounced"}


def _text_delivery(f: Fields) -> str:
    orig = f", orig_to=<{f['orig_to']}>" if "orig_to" in f else ""
    delay = f"{f['delay_s']:.2f}".rstrip("0").rstrip(".")
    said = f"{f['reply']}"
    if "mailbox" in f:  # as Postfix's local delivery says it
        said = (
            f"delivered to maildir {f['mailbox']}"
            if f["status"] == "delivered"
            else f"{said}; mailbox {f['mailbox']}"
        )
    # Last, after the status: pflogsumm reads no other field between to= and status=.
    tls = f", tls={f['tls']}" if "tls" in f else ""
    return (
        f"{f['queue_id']}: to=<{f['recipient']}>{orig}, relay={f['relay']}, delay={delay},"
        f" dsn={f['dsn']}, status={_POSTFIX_STATUS.get(str(f['status']), f['status'])} ({said})"
        f"{tls}"
    )


def host_failed(queue_id: str, host: str, ip: str, reply: str, recipients: int) -> None:
    """One MX host of an attempt did not take the message for ``recipients`` of its
    recipients (no session: refused, a 4xx or 5xx greeting, TLS; or a 4xx to them, the
    first of which ``reply`` gives), and the attempt went on to the next host if any. The
    attempt's ``delivery`` lines name only the host that gave the last word; as Postfix does
    ("connect to ...: Connection refused"), each host that failed has its own line."""
    if logs.enabled(INFO):
        fields = {
            "queue_id": queue_id,
            "host": host,
            "ip": ip,
            "reply": reply,
            "recipients": recipients,
        }
        logs.emit(INFO, "host_failed", "smtp", fields, _text_host_failed)


def _text_host_failed(f: Fields) -> str:
    n = f["recipients"]
    whom = f"{n} recipient" + ("s" if n != 1 else "")
    return f"{f['queue_id']}: {f['host']}[{f['ip']}] did not take it for {whom}: {f['reply']}"


def bounce_queued(queue_id: str, bounce_id: str, sender: str, action: str) -> None:
    """A DSN about ``queue_id`` was queued as ``bounce_id`` for ``sender``."""
    _count(1, _metrics.bounces, action)
    if logs.enabled(INFO):
        fields = {"queue_id": queue_id, "bounce_id": bounce_id, "sender": sender, "action": action}
        logs.emit(INFO, "bounce", "bounce", fields, _text_bounce)


_BOUNCE_WORDS = {
    "failed": "non-delivery",
    "delivered": "delivery",
    "relayed": "delivery",
    "expanded": "delivery",
}


def _text_bounce(f: Fields) -> str:
    kind = _BOUNCE_WORDS.get(str(f["action"]), str(f["action"]))
    return f"{f['queue_id']}: sender {kind} notification: {f['bounce_id']} to=<{f['sender']}>"


def expired(queue_id: str, age: float) -> None:
    """A message reached ``max_queue_time``: its deferred recipients bounce (logged each)."""
    fields = {"queue_id": queue_id, "age_s": round(age)}
    logs.emit(INFO, "expired", "qmgr", fields, _text_expired)


def _text_expired(f: Fields) -> str:
    return f"{f['queue_id']}: expired after {f['age_s']}s in the queue, returned to sender"


def queue_action(action: str, queue_id: str | None = None, count: int | None = None) -> None:
    """``queue delete`` or ``queue flush`` reached the running server."""
    fields: dict[str, object] = {"action": action, "queue_id": queue_id, "count": count}
    logs.emit(INFO, "queue_" + action, "qmgr", fields, _text_queue_action)


def _text_queue_action(f: Fields) -> str:
    if f["action"] == "delete":
        return f"{f['queue_id']}: removed (queue delete)"
    return f"queue flush: {f['count']} deferred messages due now"


def first_attempts(change: int) -> None:
    """A message accepted by this worker starts (+1) or ends (-1) its first attempt: it is in
    the queue, but not yet among the messages waiting for a retry."""
    _count(change, _metrics.first_attempts)


def dns_lookup(result: str) -> None:
    """One DNS query for delivery ended: ``ok``, ``nodata``, ``nxdomain``, ``timeout``,
    ``error``."""
    _count(1, _metrics.dns_lookups, result)


def sender_auth(method: str, result: str) -> None:
    """One SPF, DKIM or DMARC verdict (RFC 8601 result names: pass, fail, none, ...)."""
    _count(1, _metrics.sender_auth, method, result)
