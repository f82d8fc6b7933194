"""``queue list`` prints one tab-separated line per message, but the last error is a remote
server's reply text, which RFC 5321 §4.2 lets hold tabs (textstring = 1*(HT / SP / VCHAR)):
a greylisting reply with tabs gave that message more columns than every other, so
``cut -f7`` or ``awk -F'\\t'`` read the wrong field. A field's control characters are shown as
spaces now; ``--json`` keeps the reply as it came."""

from __future__ import annotations

import contextlib
import json
import smtplib
from collections.abc import Iterator

import pytest

from tests import smtpsink
from tests.conftest import Server, ServerFactory, wait_until
from tests.dnszone import LoopbackDNS

REPLY = "451 4.7.1 greylisted\ttry again\tin 5 minutes"


@contextlib.contextmanager
def _relayed(server_factory: ServerFactory, *targets: str) -> Iterator[Server]:
    """A server that has relayed one message, through the alias ``away@a.test``, to
    ``targets`` at b.test, a sink (replying by smtpsink.RULES), and recorded that attempt."""
    dns = LoopbackDNS("127.0.0.176")
    try:
        with smtpsink.smtp_sink("127.0.0.176") as sink:
            dns.mx("b.test", 10, "mx.b.test")
            dns.a("mx.b.test", "127.0.0.176")
            srv = server_factory(
                host="127.0.0.176",
                services=("smtp",),
                extra_toml=(
                    f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
                    f"[delivery]\nport = {sink.server_address[1]}\n"
                    'retry_intervals = ["1h"]\n[auth]\nchecks = false\n'
                ),
            )
            srv.cli("alias", "add", "away@a.test", *targets)  # mail to b.test is relayed
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as client:
                client.sendmail("", ["away@a.test"], b"Subject: t\r\n\r\nx\r\n")

            def settled() -> bool:
                shown = json.loads(srv.cli("queue", "list", "--json").stdout)
                return bool(shown) and all(r["status"] != "queued" for r in shown[0]["recipients"])

            wait_until(settled, 20, "the attempt to be recorded")
            yield srv
    finally:
        dns.stop()


def test_a_tab_in_the_last_error_keeps_seven_columns(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(smtpsink.RULES, "tabs", REPLY)
    with _relayed(server_factory, "tabs@b.test") as srv:
        rows = srv.cli("queue", "list").stdout.splitlines()
        assert len(rows) == 1
        columns = rows[0].split("\t")
        assert len(columns) == 7, columns
        assert columns[6] == REPLY.replace("\t", " ")
        shown = json.loads(srv.cli("queue", "list", "--json").stdout)
        assert shown[0]["recipients"][-1]["last_error"] == REPLY


def test_a_row_names_the_recipients_still_waiting_and_each_error_once(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like mailq: a recipient delivered already is no longer in the row, and two recipients
    deferred with one reply show it once (the row had every recipient, and the reply twice)."""
    monkeypatch.setitem(smtpsink.RULES, "grey", "451 4.7.1 greylisted")
    with _relayed(server_factory, "ok@b.test", "grey1@b.test", "grey2@b.test") as srv:
        columns = srv.cli("queue", "list").stdout.splitlines()[0].split("\t")
        assert columns[4] == "grey1@b.test,grey2@b.test"
        assert columns[6] == "451 4.7.1 greylisted"
