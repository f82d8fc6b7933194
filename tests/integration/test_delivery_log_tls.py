"""The delivery log line says whether the remote session was encrypted: with STARTTLS at the
next hop, the JSON line's ``tls`` is the session's version and cipher (as Postfix logs "TLS
connection established ... with cipher"), without it ``"none"``; a local delivery's line has no
``tls``. Before, only ``queue show`` told (and only TLS or not). Through the real server, a
loopback DNS and a loopback sink."""

from __future__ import annotations

import json
import smtplib
import ssl

import pytest
import trustme

from tests.conftest import Server, ServerFactory, wait_until
from tests.smtpsink import relay_to_sink

MESSAGE = b"From: alice@a.test\r\nTo: fwd@a.test\r\nSubject: tls\r\n\r\nhi\r\n"


def deliveries(srv: Server, count: int) -> dict[str, dict[str, object]]:
    """The JSON delivery lines by recipient, once there are ``count``."""

    def read() -> dict[str, dict[str, object]]:
        lines = [json.loads(line) for line in srv.log.read_text().splitlines()]
        found = {e["recipient"]: e for e in lines if e["event"] == "delivery"}
        return found if len(found) >= count else {}

    return wait_until(read, 20, f"{count} delivery lines")


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "plaintext"])
def test_the_delivery_line_names_the_tls_of_the_remote_session(
    server_factory: ServerFactory, starttls: bool
) -> None:
    with relay_to_sink(server_factory, extra_toml='log_format = "json"\n') as (srv, sink):
        if starttls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            trustme.CA().issue_cert("mx.b.test").configure_cert(ctx)
            sink.tls = ctx
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.sendmail("alice@a.test", ["fwd@a.test", "alice@a.test"], MESSAGE)
        wait_until(lambda: len(sink.received) == 1, 20, "the relayed message")
        by_rcpt = deliveries(srv, 2)
    remote, local = by_rcpt["bob@b.test"], by_rcpt["alice@a.test"]
    assert (remote["transport"], remote["status"]) == ("remote", "delivered")
    if starttls:
        (session,) = sink.sessions  # what the sink's end of the session says it is
        assert session.startswith("TLSv1.") and len(session.split()) == 2
        assert remote["tls"] == session
    else:
        assert sink.sessions == [] and remote["tls"] == "none"
    assert local["transport"] == "local" and "tls" not in local
    # Every other field is there as before.
    keys = {"queue_id", "recipient", "transport", "status", "dsn", "relay", "delay_s", "reply"}
    assert keys <= set(remote) and keys <= set(local)


def test_a_refusal_of_ehlo_after_starttls_is_logged_with_the_tls_it_came_over(
    server_factory: ServerFactory,
) -> None:
    """The host completes STARTTLS, then answers EHLO with a 421: the deferred line's tls is
    that session's (it said "none", as if the reply had come in plaintext)."""
    with relay_to_sink(server_factory, extra_toml='log_format = "json"\n') as (srv, sink):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("mx.b.test").configure_cert(ctx)
        sink.tls, sink.ehlo_in_tls = ctx, "421 4.3.2 too busy after all"
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.sendmail("alice@a.test", ["fwd@a.test"], MESSAGE)
        remote = deliveries(srv, 1)["bob@b.test"]
    assert (remote["status"], remote["dsn"]) == ("deferred", "4.3.2")
    assert "too busy after all" in str(remote["reply"]) and not sink.received
    (session,) = sink.sessions
    assert session.startswith("TLSv1.") and remote["tls"] == session
