"""events.py and logs.py: one event, its metric and its line (text and JSON), no forged lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path

import pytest

from postroom import events, logs
from postroom.config import Config
from postroom.metrics import parse
from postroom.queue.envelope import Envelope, Recipient
from postroom.wire import replies


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


def _setup(out: io.StringIO, fmt: str, tmp_path: Path) -> None:
    logs.setup(Config(hostname="mx.a.test", log_format=fmt), stream=out)
    events.setup(
        enabled=True,
        multiprocess_dir=None,
        data_dir=tmp_path,
        services=["smtp"],
        spool=lambda: (3, 100.0),
    )


def _envelope(service: str, user: str | None, sender: str, rcpt: str, tls: str | None) -> Envelope:
    return Envelope(
        "Q1",
        sender,
        [Recipient(rcpt)],
        0.0,
        size=8,
        wire_size=9,
        client_ip="192.0.2.1",
        auth_user=user,
        service=service,
        tls_version=tls,
    )


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse(events.exposition().decode())


@pytest.mark.parametrize(
    ("status", "reply", "dsn"),
    [
        ("deferred", "552 5.2.2 mailbox full", "4.2.2"),  # a 552 at RCPT is retried
        ("deferred", "451 too busy", "4.0.0"),
        ("bounced", "550 4.2.2 class and code disagree", "5.0.0"),  # as the DSN says it
        ("bounced", "451 4.4.1 gave out at max_queue_time", "4.4.1"),
        ("bounced", "550 5.1.1 no such user", "5.1.1"),
        ("delivered", "250 ok", "2.0.0"),
    ],
)
def test_the_dsn_field_agrees_with_what_was_done(
    log: io.StringIO, tmp_path: Path, status: str, reply: str, dsn: str
) -> None:
    _setup(log, "text", tmp_path)
    env = _envelope("smtp", None, "a@a.test", "b@b.test", None)
    env.recipients[0].status = status  # type: ignore[assignment]
    events.delivery(env, env.recipients[0], "remote", reply, "mx.b.test[192.0.2.2]:25", 0.1)
    logs.flush()
    assert f", dsn={dsn}, status=" in log.getvalue().splitlines()[-1]


def test_text_lines_postfix_style(log: io.StringIO, tmp_path: Path) -> None:
    _setup(log, "text", tmp_path)
    env = _envelope("submission", "a@a.test", "a@a.test", "b@b.test", None)
    events.accepted(env)
    env.recipients[0].status = "delivered"
    events.delivery(
        env,
        env.recipients[0],
        "remote",
        str(replies.OK),
        "mx.b.test[192.0.2.2]:25",
        0.5,
        tls="none",
    )
    events.refused(
        "smtp",
        "192.0.2.9",
        "RCPT",
        replies.USER_UNKNOWN,
        sender="x@c.test",
        recipient="nobody@a.test",
    )
    logs.flush()
    lines = log.getvalue().splitlines()
    assert lines[0].endswith(
        f"mx.a.test postroom/submission/smtpd[{os.getpid()}]: Q1: client=[192.0.2.1],"
        " sasl_username=a@a.test, tls=none, service=submission, from=<a@a.test>, to=<b@b.test>,"
        " size=9"
    )
    assert "postroom/qmgr[" in lines[1] and lines[1].endswith(
        "Q1: from=<a@a.test>, size=9, nrcpt=1 (queue active)"
    )
    assert "postroom/smtp[" in lines[2]
    assert "Q1: to=<b@b.test>, relay=mx.b.test[192.0.2.2]:25, delay=" in lines[2]
    # A remote line ends with the session's TLS (after the status: pflogsumm reads the rest).
    assert lines[2].endswith(", dsn=2.0.0, status=sent (250 2.0.0 OK), tls=none")
    assert "NOQUEUE: reject: RCPT from [192.0.2.9]: 550 5.1.1 <nobody@a.test>: Mailbox" in lines[3]
    assert "from=<x@c.test> to=<nobody@a.test>" in lines[3]
    samples = _samples()
    assert (
        samples[
            ("postroom_smtp_messages_total", (("result", "accepted"), ("service", "submission")))
        ]
        == 1
    )
    assert (
        samples[("postroom_smtp_messages_total", (("result", "rejected"), ("service", "smtp")))]
        == 1
    )
    assert (
        samples[("postroom_deliveries_total", (("result", "delivered"), ("transport", "remote")))]
        == 1
    )
    assert samples[("postroom_queue_messages", ())] == 3
    events.first_attempts(2)  # two messages in their first attempt are in the queue too
    assert _samples()[("postroom_queue_messages", ())] == 5
    events.first_attempts(-2)


def test_no_forged_lines(log: io.StringIO, tmp_path: Path) -> None:
    _setup(log, "text", tmp_path)
    events.auth_failed("smtp", "192.0.2.1", "x\r\n2030-01-01 postroom: fake", "PLAIN")
    events.refused("smtp", "192.0.2.1", "MAIL", replies.AUTH_REQUIRED, helo="h\nfake")
    # C1 controls (NEL, CSI), a line separator and a bidi override: no line, no hidden text.
    events.auth_failed("smtp", "192.0.2.1", "a\x85b\x9b31mc\u2028d\u202ee", "PLAIN")
    logs.flush()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3
    assert "warning: [192.0.2.1]: PLAIN authentication failed, sasl_username=x??2030" in lines[0]
    assert "sasl_username=a?b?31mc?d?e," in lines[2] and lines[2].isprintable()


def test_no_forged_lines_from_a_plain_log_call(log: io.StringIO, tmp_path: Path) -> None:
    """Only events were cleaned: a plain log call quoting a network value (a sender's quoted
    local part, a DMARC record's rua) wrote its line ends, C1 controls, separators and a
    terminal's escapes into the text log: whole forged lines (obs probe)."""
    _setup(log, "text", tmp_path)
    hostile = (
        "nob\u2028FORGED\x85NEL\u202eRTL\x9b2J\r\n2026-12-07T00:00:00.000Z mx postroom: x\x1b[2J"
    )
    logging.getLogger("postroom.queue").warning("no DSN: the sender %s\tis none", hostile)
    try:
        raise ValueError(f"bad {hostile}")
    except ValueError:
        logging.getLogger("postroom").exception("failed")
    logs.flush()
    lines = log.getvalue().splitlines()
    assert all(line.isprintable() or line.replace("\t", "").isprintable() for line in lines)
    assert "no DSN: the sender nob?FORGED?NEL?RTL?2J??2026-12-07" in lines[0]
    assert "\tis none" in lines[0]
    assert not any(line.startswith("2026-12-07T00:00:00.000Z") for line in lines)


def test_a_command_writes_no_forged_lines_either(capsys: pytest.CaptureFixture[str]) -> None:
    """Commands other than ``serve`` had no handler: logging's last resort printed a warning
    as it came, and ``dmarc report --now`` wrote a DNS record's CR, LF and a terminal's
    clear-screen escape to the admin's terminal (reports probe)."""
    hostile = "a@else.test\r\n2026-12-07T00:00:00.000Z mx postroom: FORGED\x1b[2J\x1b]0;pwned\x07"
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        logs.setup_command()
        logs.setup_command()  # (once is enough: no second handler)
        logging.getLogger("postroom").warning("override %s\tis refused", hostile)
        logging.getLogger("postroom").info("not shown")
    finally:
        root.handlers[:] = before
    err = capsys.readouterr().err
    assert err == (
        "postroom: warning: override a@else.test??2026-12-07T00:00:00.000Z mx postroom: "
        "FORGED?[2J?]0;pwned?\tis refused\n"
    )


def test_a_traceback_line_names_where_it_comes_from(log: io.StringIO, tmp_path: Path) -> None:
    """In text, a traceback's lines came bare after the first: a reader by line (or a grep
    for the process) met lines without their origin, nor a level."""
    _setup(log, "text", tmp_path)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("postroom").exception("the thing failed")
    logs.flush()
    lines = log.getvalue().splitlines()
    assert len(lines) > 3 and lines[0].endswith("error: the thing failed")
    head = lines[0].removesuffix("the thing failed")
    assert all(line.startswith(head + "| ") for line in lines[1:])
    assert lines[1].endswith("| Traceback (most recent call last):")
    assert lines[-1].endswith("| ValueError: boom")


def test_no_forged_json_lines(log: io.StringIO, tmp_path: Path) -> None:
    """JSON escapes only the C0 controls: a line separator, NEL, a bidi override or DEL from
    the network went into the line as it was, and a reader that splits on U+2028 or NEL
    (JavaScript, ``str.splitlines``) saw a line that does not parse. Now each is a \\u
    escape: the line is printable, and the value comes back as it was."""
    _setup(log, "json", tmp_path)
    name = "a\u2028b\x85c\u202ed\x7fe\U000e0001f"
    events.auth_failed("smtp", "192.0.2.1", name, "PLAIN")
    logs.flush()
    (line,) = log.getvalue().splitlines()
    assert line.isprintable() and "\\u2028" in line
    assert json.loads(line)["user"] == name


def test_json_lines(log: io.StringIO, tmp_path: Path) -> None:
    _setup(log, "json", tmp_path)
    env = _envelope("smtp", None, "", "b@a.test", "TLSv1.3")
    events.accepted(env)
    env.recipients[0].status = "deferred"
    text = "451 4.3.0 local delivery failed: full"
    events.delivery(env, env.recipients[0], "local", text, "local", 0.01, "b@a.test")
    events.startup("ready")
    logs.flush()
    accepted, delivery, ready = (json.loads(line) for line in log.getvalue().splitlines())
    assert list(accepted)[:3] == ["ts", "level", "event"]
    assert accepted["event"] == "accepted" and "user" not in accepted
    assert (accepted["tls"], accepted["size"]) == ("TLSv1.3", 9)
    events.accepted(_envelope("smtp", None, "", "b@a.test", None))
    logs.flush()
    plain = json.loads(log.getvalue().splitlines()[-1])  # (it was null, "none" elsewhere)
    assert (plain["event"], plain["tls"]) == ("accepted", "none")
    assert {"queue_id", "sender", "recipients", "size", "client", "service"} <= set(accepted)
    assert delivery["event"] == "delivery"
    assert {
        "queue_id",
        "recipient",
        "transport",
        "status",
        "dsn",
        "relay",
        "delay_s",
        "reply",
    } <= set(delivery)
    assert (delivery["status"], delivery["dsn"], delivery["relay"]) == (
        "deferred",
        "4.3.0",
        "local",
    )
    assert ready == {
        "ts": ready["ts"],
        "level": "info",
        "event": "startup",
        "message": "postroom: ready",
    }
    assert ready["ts"].endswith("Z") and "T" in ready["ts"]


def test_a_pop3_login_names_its_method_and_tls(log: io.StringIO, tmp_path: Path) -> None:
    """As the SMTP auth and connection lines do (and Dovecot's "method=PLAIN, TLS"): whether a
    login on port 110 came after STLS was not to be read from the logs (clients3 probe)."""
    _setup(log, "text", tmp_path)
    events.pop3_login("pop3", "192.0.2.1", "a@a.test", 3, "USER", "TLSv1.3")
    events.pop3_login("pop3s", "192.0.2.1", "a@a.test", 0, "SCRAM-SHA-256", None)
    logs.flush()
    first, second = log.getvalue().splitlines()
    assert first.endswith(
        "login: user=a@a.test, client=[192.0.2.1], service=pop3, messages=3, method=USER,"
        " tls=TLSv1.3"
    )
    assert second.endswith("messages=0, method=SCRAM-SHA-256, tls=none")  # as SMTP's lines
    log.truncate(0)
    log.seek(0)
    _setup(log, "json", tmp_path)
    events.pop3_login("pop3", "192.0.2.1", "a@a.test", 3, "PLAIN", "TLSv1.3")
    logs.flush()
    line = json.loads(log.getvalue())
    assert (line["event"], line["mechanism"], line["tls"]) == ("pop3_login", "PLAIN", "TLSv1.3")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_remote_delivery_line_names_its_tls(log: io.StringIO, tmp_path: Path, fmt: str) -> None:
    """The version and cipher of the session that gave the reply, or "none" for a plaintext
    one; a line with no session behind it (no host reached, an expiry) and a local line (its
    Maildir was reached by no session) have no tls, so that "none" means plaintext only."""
    _setup(log, fmt, tmp_path)
    env = _envelope("smtp", None, "a@a.test", "b@b.test", None)
    env.recipients[0].status = "delivered"
    relay = "mx.b.test[192.0.2.2]:25"
    cipher = "TLSv1.3 TLS_AES_256_GCM_SHA384"
    events.delivery(env, env.recipients[0], "remote", "250 ok", relay, 0.1, tls=cipher)
    events.delivery(env, env.recipients[0], "remote", "250 ok", relay, 0.1, tls="none")
    events.delivery(env, env.recipients[0], "local", "250 ok", "local", 0.1, "b@a.test")
    env.recipients[0].status = "deferred"
    events.delivery(env, env.recipients[0], "remote", "451 4.4.3 no DNS", "none", 0.1)
    # The reply is the peer's words, before ours: the last ", tls=" is the line's.
    said = "250 ok), tls=TLSv1.3 FORGED"
    events.delivery(env, env.recipients[0], "remote", said, relay, 0.1, tls="none")
    logs.flush()
    encrypted, plain, local, unreached, forged = log.getvalue().splitlines()
    if fmt == "json":
        assert json.loads(encrypted)["tls"] == cipher
        assert json.loads(plain)["tls"] == "none"
        assert "tls" not in json.loads(local) and "tls" not in json.loads(unreached)
        assert json.loads(forged)["tls"] == "none"
    else:
        assert encrypted.endswith(f"status=sent (250 ok), tls={cipher}")
        assert plain.endswith("status=sent (250 ok), tls=none")
        assert local.endswith("status=sent (delivered to maildir b@a.test)")
        assert unreached.endswith("status=deferred (451 4.4.3 no DNS)")
        assert forged.rsplit(", tls=", 1)[1] == "none"


def test_batched_observations_equal_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    values = [0.0, 0.001, 0.005, 0.0051, 0.3, 7.0, 299.0, 301.0, 1e9, 0.005]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", ["x"], registry=one, buckets=(0.005, 0.3, 300))
    h2 = Histogram("h", "h", ["x"], registry=many, buckets=(0.005, 0.3, 300))
    for v in values:
        h1.labels("a").observe(v)
    events._observe_many(h2.labels("a"), values)
    assert generate_latest(one) == generate_latest(many)


def test_start_up_lines_are_written_at_any_log_level(log: io.StringIO) -> None:
    """Scripts (and the bench) wait for ``postroom: ready``: a quieter log_level keeps it."""
    logs.setup(Config(hostname="mx.a.test", log_level="warning"), stream=log)
    events.startup("ready")
    events.note("reload", "reloaded")  # an ordinary info line stays out
    logs.flush()
    text = log.getvalue()
    assert "postroom: ready" in text and "reloaded" not in text


def test_a_servers_lines_are_written_within_the_flush_delay(
    log: io.StringIO, tmp_path: Path
) -> None:
    # A process killed at once (kill -9) loses at most FLUSH_DELAY of its log, not a second.
    _setup(log, "text", tmp_path)

    async def main() -> tuple[str, str, str]:
        logs.flush_from(asyncio.get_running_loop())
        try:
            events.accepted(_envelope("smtp", None, "a@r.test", "b@a.test", None))
            before = log.getvalue()
            await asyncio.sleep(logs.FLUSH_DELAY * 3)
            first = log.getvalue()
            events.accepted(_envelope("smtp", None, "c@r.test", "b@a.test", None))
            await asyncio.sleep(logs.FLUSH_DELAY * 3)
            return before, first, log.getvalue()
        finally:
            logs.flush_from(None)

    before, first, second = asyncio.run(main())
    assert before == ""  # written in batches, not line by line
    assert "from=<a@r.test>" in first and "from=<c@r.test>" not in first
    assert "from=<c@r.test>" in second  # the next batch is timed again


def test_workers_sharing_a_pipe_never_tear_each_others_lines() -> None:
    """Each worker wrote its batch in one write, often over PIPE_BUF: on a pipe (stderr under
    systemd or Docker) two workers' batches mixed mid-line. Writes of whole lines up to
    PIPE_BUF are kept whole (POSIX), whatever the reader's pace."""
    read_end, write_end = os.pipe()
    children = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:  # a worker: its stderr is the pipe
            try:
                os.close(read_end)
                stream = os.fdopen(write_end, "w", buffering=1)
                logs.setup(Config(hostname="mx.a.test", log_format="json"), stream=stream)
                for _batch in range(20):
                    for i in range(200):
                        logs.emit(
                            logs.INFO,
                            "probe",
                            None,
                            {"w": worker, "i": i, "pad": "x" * 90},
                            lambda _f: "",
                        )
                    logs.flush()
            finally:
                os._exit(0)
        children.append(pid)
    os.close(write_end)
    data = b""
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(1000):  # a slow reader: the pipe fills, writers block
            data += chunk
    for pid in children:
        os.waitpid(pid, 0)
    lines = data.decode().splitlines()
    assert len(lines) == 2 * 20 * 200
    for line in lines:
        assert json.loads(line)["event"] == "probe", line


def test_a_refused_client_coming_back_at_once_is_logged_once_per_interval(
    log: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe: a locked-out client's instant refusals, 111,599 in 25 s from one IP, each
    wrote a line (40 MB of log in 70 s). Every one is counted; one line per client and kind
    per interval says how many it stands for."""
    _setup(log, "json", tmp_path)
    events._repeats.clear()
    clock = [1000.0]
    monkeypatch.setattr(events.time, "monotonic", lambda: clock[0])
    for _ in range(500):
        events.login_throttled("smtp", "192.0.2.7")
        events.connection_refused("smtp", "192.0.2.7", "connection_limit")
    events.login_throttled("smtp", "192.0.2.8")  # another client: its own line
    clock[0] += events.REPEAT_INTERVAL
    events.login_throttled("smtp", "192.0.2.7")
    events.connection_refused("smtp", "192.0.2.7", "stopping")  # never left out
    logs.flush()
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    got = [(x["event"], x["client"], x.get("repeated")) for x in lines]
    assert got == [
        ("login_throttled", "192.0.2.7", None),
        ("connection_refused", "192.0.2.7", None),
        ("login_throttled", "192.0.2.8", None),
        ("login_throttled", "192.0.2.7", 499),
        ("connection_refused", "192.0.2.7", None),
    ]
    events.flush_metrics()
    samples = _samples()
    assert (
        samples[("postroom_throttled_total", (("reason", "login_lockout"), ("service", "smtp")))]
        == 502
    )
    log.truncate(0)
    log.seek(0)
    _setup(log, "text", tmp_path)
    clock[0] += events.REPEAT_INTERVAL
    for _ in range(2):
        events.connection_refused("smtp", "192.0.2.7", "connection_limit")
    clock[0] += events.REPEAT_INTERVAL
    events.connection_refused("smtp", "192.0.2.7", "connection_limit")
    logs.flush()
    assert (
        log.getvalue()
        .splitlines()[-1]
        .endswith(
            "refused connection from [192.0.2.7] service=smtp: connection_limit"
            " (and 1 more like it in the last 10s)"
        )
    )


def test_the_repeat_table_forgets_the_oldest_clients_not_all(
    log: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup(log, "json", tmp_path)
    events._repeats.clear()
    monkeypatch.setattr(events, "_REPEATS_KEPT", 3)
    monkeypatch.setattr(events.time, "monotonic", lambda: 5000.0)
    for client in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.4", "192.0.2.3"):
        events.login_throttled("smtp", client)
    logs.flush()
    clients = [json.loads(line)["client"] for line in log.getvalue().splitlines()]
    assert clients == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
