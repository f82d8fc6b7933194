"""The benchmark cases. Each runs ``runs`` times, the servers interleaved (A B C A B C ...).

Every measurement starts from an empty (SMTP) or freshly filled (POP3) mailbox and ends only when
the server is quiet again (all mail delivered), so one server's background work never lands in
another's measurement. Every wait is bounded.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchlib import clients
from benchlib.proc import BenchError, wait_until
from benchlib.report import Results
from benchlib.servers import DOMAIN, PASSWORD, RELAY_DOMAIN, SENDER_DOMAIN, Server
from benchlib.setup import SINK_DOMAIN, Lab, sink_count, start_smtp_sink

RCPT = f"u1@{DOMAIN}"
KIB = 1024


@dataclass(frozen=True)
class Options:
    runs: int
    quick: bool

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass(frozen=True)
class SmtpCase:
    size: int
    sessions: int
    keep_connection: bool
    messages: int
    quick_messages: int

    @property
    def label(self) -> str:
        per = "many msgs/conn" if self.keep_connection else "1 msg/conn"
        return f"{self.size // KIB} KiB, {self.sessions} session(s), {per}"


SMTP_CASES = [
    SmtpCase(1 * KIB, 20, False, 2000, 300),
    SmtpCase(100 * KIB, 20, False, 600, 100),
    SmtpCase(1 * KIB, 1, False, 600, 100),
    SmtpCase(100 * KIB, 1, False, 300, 60),
    SmtpCase(1 * KIB, 20, True, 2000, 300),
    SmtpCase(100 * KIB, 20, True, 600, 100),
    SmtpCase(1 * KIB, 1, True, 1000, 150),
    SmtpCase(100 * KIB, 1, True, 300, 60),
]


def available(lab: Lab, names: list[str]) -> list[Server]:
    return [s for n in names if (s := lab.get(n)) is not None]


def shown_names(lab: Lab, names: list[str]) -> list[str]:
    """How the results call the servers of ``names`` (their own names where started)."""
    return [server.name if (server := lab.get(n)) is not None else n for n in names]


def interleave(
    lab: Lab,
    results: Results,
    rows: list[str],
    names: list[str],
    runs: int,
    measure: Callable[[Server], list[float]],
) -> None:
    """Run ``measure`` for each server, ``runs`` rounds; its values fill ``rows`` in order."""
    servers = available(lab, names)
    for name in names:
        if name in lab.failed:
            for row in rows:
                results.fail(row, name, f"not started: {lab.failed[name][:200]}")
    for round_no in range(runs):
        for server in servers:
            try:
                _check_alive(server)
                values = measure(server)
            except (BenchError, OSError) as exc:
                for row in rows:
                    results.fail(row, server.name, str(exc)[:500])
                print(f"  {server.name}: FAILED: {str(exc)[:300]}", flush=True)
                continue
            for row, value in zip(rows, values, strict=False):
                results.add(row, server.name, value)
            shown = ", ".join(
                f"{v:,.1f} {results.units[r]}" for r, v in zip(rows, values, strict=False)
            )
            print(f"  run {round_no + 1}/{runs} {server.name:9s} {shown}", flush=True)


def _check_alive(server: Server) -> None:
    status = server.exit_status()
    if status is not None:
        raise BenchError(f"{server.name} exited with status {status} (see {server.log})")


def wait_delivered(server: Server, user: str, expected: int, timeout: float) -> float | None:
    """Seconds until ``expected`` messages are in ``user``'s mailbox (None after ``timeout``)."""
    start = time.perf_counter()
    if wait_until(lambda: server.mail.count(user) >= expected, timeout, interval=0.02):
        return time.perf_counter() - start
    return None


# --- SMTP accept + end-to-end ---------------------------------------------------------------------


def warm_up(lab: Lab, messages: int = 400) -> None:
    """Send each SMTP server some mail, unmeasured, before the first case.

    The first run after start-up was the slowest for every server (page cache, lazily made
    threads and processes, first writes into fresh directories): up to half the rate of the
    next runs, which made the first median a draw on which server ran first.
    """
    for server in available(lab, ["postroom", "postroom-pg", "postfix", "aiosmtpd"]):
        if server.smtp is None:
            continue
        try:
            clients.smtp_source(server.smtp, RCPT, messages, 1 * KIB, 20, False, 120)
            wait_delivered(server, RCPT, messages, 60)
        except (BenchError, OSError) as exc:
            print(f"  warm-up of {server.name} failed: {str(exc)[:200]}", flush=True)
        server.mail.clear(RCPT)


def disk_rate(root: Path, results: Results) -> float:
    """The disk's sequential write rate with one flush at the end (``dd conv=fdatasync``), on
    the bench tree's file system, in MB/s: what a durable payload rate is measured against."""
    target = root / "dd.bin"
    out = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=512", "conv=fdatasync"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stderr
    target.unlink()
    seconds = float(out.strip().splitlines()[-1].split(" copied, ")[1].split(" s")[0])
    rate = 512 * (1 << 20) / seconds / 1e6
    results.notes.append(f"disk: dd bs=1M count=512 conv=fdatasync: {rate:,.0f} MB/s")
    return rate


def smtp_case(lab: Lab, results: Results, opts: Options, case: SmtpCase) -> None:
    n = opts.count(case.messages, case.quick_messages)
    accept_row = f"SMTP accept: {case.label} (n={n})"
    e2e_row = f"end-to-end to Maildir: {case.label} (n={n})"
    payload_row = f"SMTP accept payload: {case.label} (n={n})"
    names = ["postroom", "postroom-pg", "postfix", "aiosmtpd"]
    results.declare(accept_row, "msg/s", names)
    results.declare(e2e_row, "msg/s", names[:3])
    rows = [accept_row, e2e_row]
    payload = case.size >= 100 * KIB
    if payload:
        results.declare(payload_row, "MB/s", names)
        rows.append(payload_row)
    measure = accept_and_deliver(case, n, payload=payload)
    print(f"{accept_row}", flush=True)
    interleave(lab, results, rows, names, opts.runs, measure)


def accept_and_deliver(
    case: SmtpCase,
    n: int,
    message: Path | None = None,
    sender: str | None = None,
    payload: bool = False,
) -> Callable[[Server], list[float]]:
    """Measure: ``n`` messages by smtp-source (made of ``case.size``, or the file ``message``
    from ``sender``); [accepted per second, delivered to the Maildir per second], and with
    ``payload`` the accepted MB/s."""
    timeout = 60 + n * case.size / 2e6 + n / 20
    extra = (message, sender) if message is not None and sender is not None else ()

    def measure(server: Server) -> list[float]:
        if server.smtp is None:
            raise BenchError("no SMTP listener")
        server.mail.clear(RCPT)
        elapsed = clients.smtp_source(
            server.smtp, RCPT, n, case.size, case.sessions, case.keep_connection, timeout, *extra
        )
        rest = wait_delivered(server, RCPT, n, timeout)
        if rest is None:
            raise BenchError(
                f"only {server.mail.count(RCPT)} of {n} messages reached the mailbox "
                f"within {timeout:.0f}s after the last 250"
            )
        rates = [n / elapsed, n / (elapsed + rest)]
        return rates + ([n * case.size / elapsed / 1e6] if payload else [])

    return measure


# --- submission ---------------------------------------------------------------------------------


def submission_case(
    lab: Lab, results: Results, opts: Options, per_connection: int, n: int, workers: int = 4
) -> None:
    """Few messages per session weigh TLS + argon2id logins; many weigh the message path."""
    row = f"submission STARTTLS+AUTH: 1 KiB, {workers} clients, {per_connection} msgs/conn (n={n})"
    _submission_rows(lab, results, opts, row, ["postroom", "postfix"], per_connection, n, workers)


def _submission_rows(
    lab: Lab,
    results: Results,
    opts: Options,
    row: str,
    names: list[str],
    per_connection: int,
    n: int,
    workers: int = 4,
) -> None:
    """Submit ``n`` messages (1 KiB, STARTTLS + AUTH PLAIN) to each server of ``names``."""
    results.declare(row, "msg/s", shown_names(lab, names))
    body = clients.make_submission_body(RCPT, RCPT, KIB)
    timeout = 120 + n / 5

    def measure(server: Server) -> list[float]:
        if server.submission is None:
            raise BenchError("no submission port (Postfix needs Dovecot's SASL socket)")
        server.mail.clear(RCPT)
        job = clients.SubmissionJob(
            server.submission, RCPT, PASSWORD, RCPT, n, per_connection, body
        )
        elapsed = clients.submission(job, workers, timeout)
        if wait_delivered(server, RCPT, n, timeout) is None:
            raise BenchError(f"only {server.mail.count(RCPT)} of {n} submitted messages delivered")
        return [n / elapsed]

    print(row, flush=True)
    interleave(lab, results, [row], names, opts.runs, measure)


# --- POP3 -----------------------------------------------------------------------------------------


def pop3_case(lab: Lab, results: Results, opts: Options, clients_n: int, stls: bool) -> None:
    n = opts.count(5000, 1000)
    size = 10 * KIB
    mode = "STLS" if stls else "plaintext"
    label = f"POP3 RETR+DELE: {mode}, {clients_n} client(s), {n} x 10 KiB each"
    rows = [f"{label}: msg/s", f"{label}: MB/s"]
    names = ["postroom", "postroom-pg", "dovecot"]
    for row, unit in zip(rows, ("msg/s", "MB/s"), strict=True):
        results.declare(row, unit, names)
    mailboxes = [f"u{i}@{DOMAIN}" for i in range(1, clients_n + 1)]
    timeout = 120 + clients_n * n / 50

    def measure(server: Server) -> list[float]:
        if server.pop3 is None:
            raise BenchError("no POP3 listener")
        for user in mailboxes:
            # The same files for both servers, as both store mail: LF line ends, names with
            # ",S=<file size>,W=<size with CRLF>"; both send CRLF on the wire.
            server.mail.fill(user, n, size)
        os.sync()  # setup writes must not be flushed during the measurement
        jobs = [clients.Pop3Job(server.pop3, user, PASSWORD, stls, n) for user in mailboxes]
        elapsed, messages, octets = clients.pop3(jobs, timeout)
        left = sum(server.mail.count_messages(u) for u in mailboxes)
        if messages != n * clients_n or left:
            raise BenchError(f"retrieved {messages} of {n * clients_n}; {left} left after QUIT")
        return [messages / elapsed, octets / elapsed / 1e6]

    print(label, flush=True)
    interleave(lab, results, rows, names, opts.runs, measure)


# --- relay ----------------------------------------------------------------------------------------


def relay_case(
    lab: Lab, results: Results, opts: Options, workers: int = 4, per_connection: int = 25
) -> None:
    n = opts.count(1000, 200)
    row = f"relay via MX on loopback: submission -> A -> B Maildir, 1 KiB (n={n})"
    results.declare(row, "msg/s", ["postroom", "postfix"])
    remote_rcpt = f"u1@{RELAY_DOMAIN}"
    body = clients.make_submission_body(RCPT, remote_rcpt, KIB)
    timeout = 120 + n / 5
    pairs = {"postroom": "postroom-remote", "postfix": "postfix-remote"}

    def measure(server: Server) -> list[float]:
        remote = lab.get(pairs[server.name])
        if remote is None or server.submission is None:
            raise BenchError(f"{pairs[server.name]} or the submission port is missing")
        remote.mail.clear(remote_rcpt)
        job = clients.SubmissionJob(
            server.submission, RCPT, PASSWORD, remote_rcpt, n, per_connection, body
        )
        start = time.perf_counter()
        clients.submission(job, workers, timeout)
        if wait_delivered(remote, remote_rcpt, n, timeout) is None:
            raise BenchError(
                f"only {remote.mail.count(remote_rcpt)} of {n} relayed messages arrived"
            )
        return [n / (time.perf_counter() - start)]

    print(row, flush=True)
    interleave(lab, results, [row], list(pairs), opts.runs, measure)


def mixed_case(lab: Lab, results: Results, opts: Options, workers: int = 4) -> None:
    """One local and one remote recipient (the remote MX: Postfix's smtp-sink on loopback)
    against one local recipient, both through submission: the remote copy should cost little
    at intake."""
    n = opts.count(1000, 200)
    remote_rcpt = f"u1@{SINK_DOMAIN}"
    local_row = f"accept, 1 local recipient, 1 KiB (n={n})"
    mixed_row = f"accept, 1 local + 1 remote recipient (smtp-sink), 1 KiB (n={n})"
    for row in (local_row, mixed_row):
        results.declare(row, "msg/s", ["postroom"])
    server = lab.get("postroom")
    if server is None or server.submission is None:
        raise BenchError("the mixed case needs postroom")
    sink = start_smtp_sink(lab.root / "smtp-sink", lab.cleanup)
    timeout = 120 + n / 5
    print(mixed_row, flush=True)
    for _ in range(opts.runs):
        for row, rcpts in ((local_row, RCPT), (mixed_row, f"{RCPT},{remote_rcpt}")):
            server.mail.clear(RCPT)
            before = sink_count(sink)
            body = clients.make_submission_body(RCPT, rcpts, KIB)
            job = clients.SubmissionJob(server.submission, RCPT, PASSWORD, rcpts, n, 100, body)
            try:
                elapsed = clients.submission(job, workers, timeout)
                if wait_delivered(server, RCPT, n, timeout) is None:
                    raise BenchError(f"only {server.mail.count(RCPT)} of {n} arrived locally")
                reached = functools.partial(lambda t: sink_count(sink) >= t, before + n)
                if row == mixed_row and not wait_until(reached, timeout):
                    raise BenchError(f"only {sink_count(sink) - before} of {n} reached smtp-sink")
            except BenchError as exc:
                results.fail(row, "postroom", str(exc))
                continue
            results.add(row, "postroom", n / elapsed)
    local, mixed = results.rows[local_row]["postroom"], results.rows[mixed_row]["postroom"]
    if local and mixed:
        ratio = statistics.median(mixed) / statistics.median(local)
        results.notes.append(f"one local + one remote recipient: {ratio:.0%} of all-local mail")


# --- sender authentication ------------------------------------------------------------------------

AUTH_MX_CASE = SmtpCase(1 * KIB, 20, False, 2000, 300)
AUTH_SENDER = f"sender@{SENDER_DOMAIN}"
# postroom with SPF, DKIM and DMARC on; Postfix + OpenDKIM + OpenDMARC + policyd-spf; postroom
# with them off. The first is the subject, the others the references.
AUTH_MX = ["postroom-auth", "postfix-auth", "postroom-plain"]
# Submission: DKIM signing on (postroom-auth) against off (postroom-plain).
AUTH_SUBMISSION = ["postroom-auth", "postroom-plain"]


def _newest(box: Path) -> bytes:
    files = sorted((box / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return files[-1].read_bytes() if files else b""


def _wait_signing(server: Server, timeout: float = 60) -> None:
    """postroom signs once it has seen its own keys in DNS: submit until a message is signed
    with both, so that no measured message goes out unsigned."""
    if server.submission is None:
        raise BenchError("no submission port")
    box = server.mailbox(RCPT)
    body = clients.make_submission_body(RCPT, RCPT, KIB)
    job = clients.SubmissionJob(server.submission, RCPT, PASSWORD, RCPT, 1, 1, body)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.mail.clear(RCPT)
        clients.submission(job, 1, 60)
        if (
            wait_delivered(server, RCPT, 1, 30) is not None
            and _newest(box).count(b"DKIM-Signature:") == 2
        ):
            server.mail.clear(RCPT)
            return
        time.sleep(0.5)
    raise BenchError(f"{server.name} did not sign with both keys within {timeout:.0f}s")


def _check_verdicts(server: Server, message: Path) -> None:
    """One signed message through the MX port; the server must have found SPF, DKIM and DMARC
    all pass (postroom, Postfix's milters), or added no results (checks off)."""
    if server.smtp is None:
        raise BenchError("no SMTP listener")
    box = server.mailbox(RCPT)
    server.mail.clear(RCPT)
    clients.smtp_source(server.smtp, RCPT, 1, KIB, 1, False, 60, message, AUTH_SENDER)
    if wait_delivered(server, RCPT, 1, 30) is None:
        raise BenchError(f"{server.name}: the signed message was not delivered")
    text = _newest(box).replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode(errors="replace")
    results = [
        line
        for line in text.replace("\n\t", " ").replace("\n ", " ").splitlines()
        if line.lower().startswith("authentication-results:")
    ]
    server.mail.clear(RCPT)
    if server.name == "postroom-checks-off":
        if results:
            raise BenchError(f"{server.name} checked after all: {results}")
        return
    joined = " ".join(results)
    missing = [v for v in ("spf=pass", "dkim=pass", "dmarc=pass") if v not in joined]
    if missing:
        raise BenchError(f"{server.name}: {', '.join(missing)} missing from {results}")
    print(f"  {server.name}: " + " | ".join(r.split(":", 1)[1].strip() for r in results))


def auth_cases(lab: Lab, results: Results, opts: Options, mx: bool, submission: bool) -> None:
    """The sender-authentication groups: what each server finds in the signed message, then
    the MX case (``mx``) and the submission cases (``submission``)."""
    message = lab.signed_message
    assert message is not None
    print("sender authentication: checking that every server sees spf, dkim, dmarc pass")
    for name in AUTH_MX:
        server = lab.get(name)
        if server is None:
            continue
        try:
            if name == "postroom-auth":
                _wait_signing(server)
            _check_verdicts(server, message)
        except (BenchError, OSError) as exc:
            lab.failed[name] = str(exc)
            del lab.servers[name]
            print(f"  {name}: FAILED: {str(exc)[:500]}", flush=True)
    if mx:
        _auth_mx_case(lab, results, opts, message)
    if submission:
        # Unmeasured: the first logins of a server were the slowest (as the SMTP warm-up).
        body = clients.make_submission_body(RCPT, RCPT, KIB)
        for server in available(lab, AUTH_SUBMISSION):
            if server.submission is not None:
                job = clients.SubmissionJob(server.submission, RCPT, PASSWORD, RCPT, 40, 5, body)
                clients.submission(job, 4, 120)
                wait_delivered(server, RCPT, 40, 60)
                server.mail.clear(RCPT)
        for per_connection, full, quick in ((5, 300, 60), (100, 2000, 400)):
            n = quick if opts.quick else full
            row = (
                f"submission, DKIM signing on vs off: 1 KiB, 4 clients, {per_connection} "
                f"msgs/conn (n={n})"
            )
            _submission_rows(lab, results, opts, row, AUTH_SUBMISSION, per_connection, n)


def _auth_mx_case(lab: Lab, results: Results, opts: Options, message: Path) -> None:
    warm = opts.count(400, 80)
    for server in available(lab, AUTH_MX):
        if server.smtp is not None:
            clients.smtp_source(server.smtp, RCPT, warm, KIB, 20, False, 120, message, AUTH_SENDER)
            wait_delivered(server, RCPT, warm, 60)
            server.mail.clear(RCPT)
    case = AUTH_MX_CASE
    n = opts.count(case.messages, case.quick_messages)
    row = f"MX accept, SPF+DKIM+DMARC: 1 KiB signed, 20 sessions, 1 msg/conn (n={n})"
    e2e = f"MX end-to-end, SPF+DKIM+DMARC: 1 KiB signed, 20 sessions, 1 msg/conn (n={n})"
    results.declare(row, "msg/s", shown_names(lab, AUTH_MX))
    results.declare(e2e, "msg/s", shown_names(lab, AUTH_MX))
    measure = accept_and_deliver(case, n, message, AUTH_SENDER)
    print(row, flush=True)
    interleave(lab, results, [row, e2e], AUTH_MX, opts.runs, measure)


# --- several nodes on PostgreSQL --------------------------------------------------------------


def cluster_case(lab: Lab, results: Results, opts: Options) -> None:
    """The same 1 KiB, 20-session intake through one node, and split over two nodes on the
    same database (10 sessions each, both at once): two nodes should be no slower."""
    n = opts.count(2000, 300)
    one_row = f"PostgreSQL intake: 1 KiB, 20 sessions into 1 node (n={n})"
    two_row = f"PostgreSQL intake: 1 KiB, 2 x 10 sessions into 2 nodes (n={n})"
    for row in (one_row, two_row):
        results.declare(row, "msg/s", ["postroom-pg"])
    first, second = lab.get("postroom-pg"), lab.get("postroom-pg2")
    if first is None or second is None or first.smtp is None or second.smtp is None:
        raise BenchError("the cluster case needs postroom-pg and postroom-pg2")
    timeout = 120 + n / 20
    print(two_row, flush=True)
    for round_no in range(opts.runs):
        for row, targets in (
            (one_row, [(first, 20, n)]),
            (two_row, [(first, 10, n // 2), (second, 10, n - n // 2)]),
        ):
            first.mail.clear(RCPT)
            start = time.perf_counter()
            with ThreadPoolExecutor(len(targets)) as pool:
                jobs = [
                    pool.submit(
                        clients.smtp_source, s.smtp, RCPT, count, KIB, sessions, False, timeout
                    )
                    for s, sessions, count in targets
                    if s.smtp is not None
                ]
                try:
                    for job in jobs:
                        job.result()
                except BenchError as exc:
                    results.fail(row, "postroom-pg", str(exc)[:500])
                    continue
            elapsed = time.perf_counter() - start
            if wait_delivered(first, RCPT, n, timeout) is None:
                results.fail(row, "postroom-pg", f"only {first.mail.count(RCPT)} of {n} stored")
                continue
            results.add(row, "postroom-pg", n / elapsed)
            print(
                f"  run {round_no + 1}/{opts.runs} {row[:60]}: {n / elapsed:,.1f} msg/s", flush=True
            )
    one, two = results.rows[one_row]["postroom-pg"], results.rows[two_row]["postroom-pg"]
    if one and two:
        ratio = statistics.median(two) / statistics.median(one)
        results.notes.append(f"two PostgreSQL nodes together: {ratio:.0%} of one node's intake")
