"""Each MX host that did not take a message has its own log line (``host_failed``): a refused
first MX left no trace, the delivery lines naming only the host with the last word. Counted
are the recipients that wait for the next host or attempt, with the first one's reply: the
first version counted a recipient that a 452 "too many" sent again at once to the same host
(and took there), and gave that 452 as the reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from postroom import config, events
from postroom.delivery import remote
from postroom.resolver import Route, Target
from postroom.smtp.client_engine import (
    ForwardPath,
    MessageDone,
    Outcome,
    OutgoingMessage,
    RecipientResult,
)
from postroom.wire.replies import Reply


def test_one_line_per_host_for_the_recipients_it_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    lines: list[tuple[object, ...]] = []
    monkeypatch.setattr(events, "host_failed", lambda *a: lines.append(a))
    cfg = config.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": str(tmp_path)}
    )

    class Resolver:
        async def route(self, domain: str) -> Route:
            return Route(
                (Target("mx1.b.test", ("192.0.2.1",), 10), Target("mx2.b.test", ("192.0.2.2",), 20))
            )

    delivery = remote.RemoteDelivery(cfg, Resolver())  # type: ignore[arg-type]
    said = {
        ("192.0.2.1", "r1@b.test"): [Reply.make(250, "2.0.0", "ok")],
        ("192.0.2.1", "r2@b.test"): [Reply.make(450, "4.2.1", "mailbox busy")],
        ("192.0.2.1", "r3@b.test"): [
            Reply.make(452, "4.5.3", "too many recipients"),
            Reply.make(250, "2.0.0", "ok"),
        ],
        ("192.0.2.2", "r2@b.test"): [Reply.make(250, "2.0.0", "ok")],
    }

    async def deliver_at(
        target: Target, ip: str, message: OutgoingMessage, *_args: object
    ) -> tuple[MessageDone, str]:
        out = []
        for r in message.recipients:
            reply = said[ip, r.address].pop(0)
            outcome = Outcome.DELIVERED if reply.code == 250 else Outcome.TEMPORARY
            out.append(RecipientResult(r, outcome, reply))
        return MessageDone(tuple(out), True), "TLSv1.3"

    monkeypatch.setattr(delivery, "_deliver_at", deliver_at)
    rcpts = tuple(ForwardPath(a) for a in ("r1@b.test", "r2@b.test", "r3@b.test"))
    results = asyncio.run(
        delivery.deliver("b.test", OutgoingMessage("s@a.test", rcpts), b"x", queue_id="QID")
    )
    assert [r.reply.code for r in results] == [250, 250, 250]
    assert lines == [("QID", "mx1.b.test", "192.0.2.1", "450 4.2.1 mailbox busy", 1)]
