"""remote.py end to end: a small asyncio SMTP sink on 127.0.0.x, routes from StaticResolver."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from postroom.config import Config, DeliveryConfig, Duration, ListenConfig
from postroom.delivery.remote import DeliveryResult, RemoteDelivery, needs_relayed_dsn
from postroom.resolver import Route, RouteFailure, StaticResolver, Target
from postroom.smtp.client_engine import ForwardPath as Recipient
from postroom.smtp.client_engine import Outcome, OutgoingMessage
from postroom.tls import client_context
from tests import conftest

BODY = b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\n\r\nline one\r\n.leading dot\r\n"


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool


@dataclass
class Sink:
    """A minimal SMTP server: enough of RFC 5321 to receive, with knobs for failures."""

    host: str
    port: int
    greeting: bytes = b"220 sink.test ESMTP"
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES")
    reject: set[str] = field(default_factory=set)
    tempfail: set[str] = field(default_factory=set)
    max_rcpts: int | None = None  # beyond it: 452 4.5.3 too many recipients
    # After this many messages on a connection: the next MAIL gets ``goodbye`` (None: no
    # reply at all) and the connection closes, as a server with an idle time-out or a limit
    # on messages per session does.
    per_session: int | None = None
    goodbye: bytes | None = b"421 4.7.0 enough for this session, closing"
    tls: ssl.SSLContext | None = None
    inject_after_starttls: bool = False  # 220 to STARTTLS with plaintext behind it, no TLS
    after_ehlo: bytes = b""  # sent in the same write as the EHLO reply (a stray reply line)
    ehlo_in_tls: bytes | None = None  # the reply to EHLO after STARTTLS (then it hangs up)
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    peers: list[str] = field(default_factory=list)  # the client address of each connection
    server: asyncio.Server | None = None

    async def start(self) -> Sink:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            await self._session(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(text: str | bytes) -> None:
            writer.write((text.encode() if isinstance(text, str) else text) + b"\r\n")

        say(self.greeting)
        if not self.greeting.startswith(b"220"):
            await writer.drain()
            return
        secure = False
        sender: str | None = None
        rcpts: list[str] = []
        taken = 0
        while line := await reader.readline():
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(cmd)
            verb = cmd[:4].upper()
            if verb == "EHLO" and secure and self.ehlo_in_tls is not None:
                say(self.ehlo_in_tls)
                await writer.drain()
                return
            if verb == "EHLO":
                ext = list(self.extensions)
                if self.tls is not None and not secure:
                    ext.append("STARTTLS")
                lines = ["sink.test hello", *ext]
                for i, text in enumerate(lines):
                    say(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
                if self.after_ehlo:
                    say(self.after_ehlo)
            elif verb == "HELO":
                say("250 sink.test")
            elif verb == "STAR" and self.tls is not None and self.inject_after_starttls:
                say("220 2.0.0 go ahead\r\n250 injected")
                await writer.drain()
                await reader.read()  # the client hangs up
                return
            elif verb == "STAR" and self.tls is not None:
                say("220 2.0.0 go ahead")
                await writer.drain()
                await writer.start_tls(self.tls)
                secure = True
                sender, rcpts = None, []
            elif verb == "MAIL" and taken == self.per_session:
                if self.goodbye is not None:
                    say(self.goodbye)
                    await writer.drain()
                return
            elif verb == "MAIL":
                sender = cmd[10:].split(">")[0].lstrip("<")
                say("250 2.1.0 ok")
            elif verb == "RCPT":
                addr = cmd[8:].split(">")[0].lstrip("<")
                if sender is None:
                    say("503 5.5.1 need MAIL")
                elif addr in self.reject:
                    say("550 5.1.1 no such user")
                elif addr in self.tempfail:
                    say("450 4.2.1 try again later")
                elif self.max_rcpts is not None and len(rcpts) >= self.max_rcpts:
                    say("452 4.5.3 too many recipients")
                else:
                    rcpts.append(addr)
                    say("250 2.1.5 ok")
            elif verb == "DATA":
                if not rcpts or sender is None:
                    say("554 5.5.1 no valid recipients")
                    continue
                say("354 go ahead")
                await writer.drain()
                chunks = []
                while (data_line := await reader.readline()) != b".\r\n":
                    if not data_line:
                        return
                    chunks.append(data_line[1:] if data_line.startswith(b".") else data_line)
                self.messages.append(Received(sender, rcpts, b"".join(chunks), secure))
                taken += 1
                say("250 2.0.0 queued")
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                say("250 2.0.0 ok")
            elif verb == "QUIT":
                say("221 2.0.0 bye")
                await writer.drain()
                return
            else:
                say("502 5.5.1 not implemented")
            await writer.drain()


def free_port() -> int:
    return conftest.free_port("127.0.0.2")


def config(port: int, **delivery: Any) -> Config:
    return Config(
        hostname="mx.a.test",
        domains=("a.test",),
        listen=ListenConfig(smtp=(("127.0.0.1", port + 1),)),
        delivery=DeliveryConfig(port=port, connect_timeout=Duration(2), **delivery),
    )


def message(*rcpts: str) -> OutgoingMessage:
    return OutgoingMessage("alice@a.test", tuple(Recipient(r) for r in rcpts))


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def mx(host: str, ip: str, pref: int) -> Target:
    return Target(host, (ip,), pref)


def deliver_once(
    data: bytes,
    msg: OutgoingMessage | None = None,
    delivery: dict[str, Any] | None = None,
    **sink_args: Any,
) -> tuple[DeliveryResult, Sink]:
    """One message (to bob@b.test unless ``msg`` says) through a fresh Sink at mx.b.test;
    ``delivery``: ``[delivery]`` settings."""
    port = free_port()
    out: list[tuple[DeliveryResult, Sink]] = []

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, **sink_args).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port, **(delivery or {})), resolver, reply_timeout=5)
        try:
            (result,) = await remote.deliver("b.test", msg or message("bob@b.test"), data)
        finally:
            await remote.aclose()
            await sink.stop()
        out.append((result, sink))

    run(main)
    return out[0]


def test_outbound_connections_come_from_bind_address() -> None:
    # On a host with several addresses, the one SPF and the reverse DNS name (Postfix's
    # smtp_bind_address).
    result, sink = deliver_once(BODY, delivery={"bind_address": "127.0.0.9"})
    assert result.outcome is Outcome.DELIVERED
    assert sink.peers == ["127.0.0.9"]


def test_an_ipv4_mapped_address_is_dialled_as_ipv4() -> None:
    """An MX whose AAAA record is ::ffff:192.0.2.1 (or mail to user@[IPv6:::ffff:...]) is an
    IPv4 host: dialled as IPv6 from bind_address6 it was "Network is unreachable" for good
    (ipv6 probe); it goes from bind_address, as any IPv4 host."""
    port = free_port()
    out: list[tuple[DeliveryResult, Sink]] = []

    async def main() -> None:
        sink = await Sink("127.0.0.2", port).start()
        route = Route((mx("mx.b.test", "::ffff:127.0.0.2", 10),))
        cfg = config(port, bind_address="127.0.0.9", bind_address6="::1")
        remote = RemoteDelivery(cfg, StaticResolver({"b.test": route}), reply_timeout=5)
        try:
            (result,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        out.append((result, sink))

    run(main)
    result, sink = out[0]
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert sink.peers == ["127.0.0.9"]


def test_delivers_with_per_recipient_results() -> None:
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, reject={"nobody@b.test"}).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            results = await remote.deliver("b.test", message("bob@b.test", "nobody@b.test"), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        bob, nobody = results
        assert bob.outcome is Outcome.DELIVERED
        assert bob.remote_mta == "mx.b.test"
        assert nobody.outcome is Outcome.PERMANENT
        assert nobody.reply.status == "5.1.1"
        assert nobody.remote_mta == "mx.b.test"
        (got,) = sink.messages
        assert got.sender == "alice@a.test"
        assert got.recipients == ["bob@b.test"]
        assert got.data == BODY
        assert any(c.startswith("MAIL FROM:<alice@a.test> SIZE=") for c in sink.commands)

    run(main)


def test_recipients_over_the_peers_limit_go_in_further_transactions_at_once() -> None:
    # RFC 5321 §4.5.3.1.10: they waited for the next retry interval (hours, for many).
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, max_rcpts=2, tempfail={"busy@b.test"}).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        rcpts = [f"r{i}@b.test" for i in range(5)] + ["busy@b.test"]
        try:
            results = await remote.deliver("b.test", message(*rcpts), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 5 + [Outcome.TEMPORARY]
        assert [m.recipients for m in sink.messages] == [
            ["r0@b.test", "r1@b.test"],
            ["r2@b.test", "r3@b.test"],
            ["r4@b.test"],
        ]
        assert sink.connections == 1

    run(main)


def test_falls_back_to_the_second_mx_when_the_first_is_down() -> None:
    port = free_port()

    async def main() -> None:
        # Nothing listens on 127.0.0.3: connection refused, then the next MX.
        sink = await Sink("127.0.0.4", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route(
                    (
                        mx("mx1.b.test", "127.0.0.3", 10),
                        mx("mx2.b.test", "127.0.0.4", 20),
                    )
                )
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        calls = 0

        async def load() -> bytes:
            nonlocal calls
            calls += 1
            return BODY

        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), load)
        finally:
            await remote.aclose()
            await sink.stop()
        assert res.outcome is Outcome.DELIVERED
        assert res.remote_mta == "mx2.b.test"
        assert len(sink.messages) == 1
        assert calls == 1

    run(main)


def test_a_host_that_timed_out_is_not_dialled_again_for_a_while() -> None:
    """RFC 5321 §4.5.4.1: a client SHOULD keep a list of hosts it cannot reach. A tarpit (it
    accepts the connection, never greets) was dialled for every message, each waiting the
    whole time-out: 200 messages held the destination's slots for 100 minutes (sched
    probe). Until the first retry interval ends it is passed over: the next MX at once, or
    deferred with no connection; but not for a retry due after it timed out (the retry is
    what that message waited for); ``queue flush`` (forget_unreachable) dials it again."""
    port = free_port()

    async def main() -> None:
        accepted = 0
        held: list[asyncio.StreamWriter] = []

        async def tarpit(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            held.append(w)  # (never a greeting; closed at the end)

        pit = await asyncio.start_server(tarpit, "127.0.0.3", port)
        sink = await Sink("127.0.0.4", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route(
                    (mx("pit.b.test", "127.0.0.3", 10), mx("mx.b.test", "127.0.0.4", 20))
                ),
                "c.test": Route((mx("pit.c.test", "127.0.0.3", 10),)),
                "d.test": Route((mx("pit.d.test", "::ffff:127.0.0.3", 10),)),  # that host
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=0.3)
        try:
            (first,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            assert first.outcome is Outcome.DELIVERED and accepted == 1
            started = time.monotonic()
            (second,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            (other,) = await remote.deliver("c.test", message("carol@c.test"), BODY)
            assert time.monotonic() - started < 0.25 and accepted == 1  # not dialled
            assert second.outcome is Outcome.DELIVERED and len(sink.messages) == 2
            assert other.outcome is Outcome.TEMPORARY and other.reply.status == "4.4.1"
            assert "pit.c.test[127.0.0.3]: delivery temporarily suspended: " in str(other.reply)
            assert "time-out" in str(other.reply)
            (mapped,) = await remote.deliver("d.test", message("dan@d.test"), BODY)
            assert mapped.outcome is Outcome.TEMPORARY and accepted == 1
            # A retry due after the time-out is what its wait was for: dialled.
            (retry,) = await remote.deliver(
                "c.test", message("carol@c.test"), BODY, marked_since=time.time()
            )
            assert retry.outcome is Outcome.TEMPORARY and accepted == 2
            remote.forget_unreachable()
            (again,) = await remote.deliver("c.test", message("carol@c.test"), BODY)
            assert again.outcome is Outcome.TEMPORARY and accepted == 3
        finally:
            await remote.aclose()
            await sink.stop()
            for w in held:
                w.close()
            pit.close()
            await pit.wait_closed()

    run(main)


def test_421_greeting_and_temp_rcpt_move_on_to_the_next_host() -> None:
    port = free_port()

    async def main() -> None:
        busy = await Sink("127.0.0.5", port, greeting=b"421 4.3.2 busy").start()
        grey = await Sink("127.0.0.6", port, tempfail={"bob@b.test"}).start()
        good = await Sink("127.0.0.7", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route(
                    (
                        Target("mx1.b.test", ("127.0.0.5", "127.0.0.6"), 10),
                        mx("mx2.b.test", "127.0.0.7", 20),
                    )
                )
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            for s in (busy, grey, good):
                await s.stop()
        assert res.outcome is Outcome.DELIVERED
        assert res.remote_mta == "mx2.b.test"
        assert busy.connections == 1
        assert grey.connections == 1
        assert not grey.messages
        assert len(good.messages) == 1

    run(main)


def test_a_stop_keeps_what_an_earlier_host_took_in_the_same_attempt() -> None:
    # mx1 took ann (its 250 to the dot commits her, RFC 5321 §6.1) and deferred ben; a stop
    # came while ben went to mx2. The stop's LeaseLost dropped ann's result with ben's: she
    # stayed queued, and got the message again after the restart. The caller reads hers in
    # ``final`` now, given DotWithheld for ben.
    from postroom.delivery.remote import FENCED, NOT_TRIED, DotWithheld

    port = free_port()

    async def main(fence: bool) -> None:
        first = await Sink("127.0.0.5", port, tempfail={"ben@b.test"}).start()
        second = await Sink("127.0.0.6", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route(
                    (mx("mx1.b.test", "127.0.0.5", 10), mx("mx2.b.test", "127.0.0.6", 20))
                )
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)

        asked: list[str] = []

        def stop_after_this_one() -> bool:  # asked at each final dot, after the stop's check
            asked.append("dot")
            if fence:
                return len(asked) == 1  # the lease is not confirmed for the second one
            remote.stopping = True
            return True

        final: dict[int, DeliveryResult] = {}
        try:
            with pytest.raises(DotWithheld) as withheld:
                await remote.deliver(
                    "b.test",
                    message("ann@b.test", "ben@b.test"),
                    BODY,
                    stop_after_this_one,
                    final=final,
                )
        finally:
            await remote.aclose()
            for s in (first, second):
                await s.stop()
        ann, ben = final[0], final[1]  # ben's: what mx1 said, not the stop's words
        assert ann.outcome is Outcome.DELIVERED and ann.remote_mta == "mx1.b.test"
        assert ben.outcome is Outcome.TEMPORARY and ben.remote_mta == "mx1.b.test"
        assert withheld.value.reply == (FENCED if fence else NOT_TRIED)  # mx2 not dialled
        assert [m.recipients for m in first.messages] == [["ann@b.test"]]
        assert second.messages == []  # its final dot never went out

    for fence in (False, True):
        run(lambda fence=fence: main(fence))


def past_a_failing_second_host(
    second: dict[str, Any], patch: Callable[[RemoteDelivery], None] | None = None
) -> list[Sink]:
    """ann and ben to b.test: mx1 takes ann and defers ben, mx2 (a Sink with ``second``, or
    whatever ``patch`` makes of the delivery) fails, and mx3 must get ben: ann's 250 is
    kept. The three sinks, stopped."""
    port = free_port()
    sinks: list[Sink] = []

    async def main() -> None:
        sinks.append(await Sink("127.0.0.5", port, tempfail={"ben@b.test"}).start())
        sinks.append(await Sink("127.0.0.6", port, **second).start())
        sinks.append(await Sink("127.0.0.7", port).start())
        hosts = [mx(f"mx{n}.b.test", f"127.0.0.{n + 4}", n * 10) for n in (1, 2, 3)]
        resolver = StaticResolver({"b.test": Route(tuple(hosts))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        if patch is not None:
            patch(remote)
        try:
            ann, ben = await remote.deliver("b.test", message("ann@b.test", "ben@b.test"), BODY)
        finally:
            await remote.aclose()
            for sink in sinks:
                await sink.stop()
        assert ann.outcome is Outcome.DELIVERED and ann.remote_mta == "mx1.b.test"
        assert ben.outcome is Outcome.DELIVERED and ben.remote_mta == "mx3.b.test"
        assert [m.recipients for m in sinks[2].messages] == [["ben@b.test"]]

    run(main)
    return sinks


def test_a_stray_reply_line_fails_that_host_and_the_next_one_is_tried() -> None:
    # One reply line too many with the EHLO reply closed the engine after its Ready: the
    # session was handed out closed, send_message raised EngineMisuse, the backup MX was never
    # tried, and 250s earlier hosts gave in that attempt were lost (sent again).
    _first, stray, _good = past_a_failing_second_host({"after_ehlo": b"250 2.0.0 stray line"})
    assert stray.messages == [] and stray.connections == 1


def test_a_bug_with_one_host_keeps_what_earlier_hosts_took(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An error of ours in mx2's transaction escaped deliver(): the whole domain was deferred,
    # mx3 never tried, and mx1's 250 for ann dropped (she got the message again).
    def bug_at_mx2(remote: RemoteDelivery) -> None:
        transact = remote._transact

        async def failing(session: Any, target: Any, ip: str, *args: Any) -> Any:
            if ip == "127.0.0.6":
                raise RuntimeError("a bug")
            return await transact(session, target, ip, *args)

        remote._transact = failing  # type: ignore[method-assign]

    past_a_failing_second_host({}, bug_at_mx2)
    assert "delivery to mx2.b.test[127.0.0.6] failed" in caplog.text  # with its traceback


def test_everything_down_is_temporary() -> None:
    port = free_port()

    async def main() -> None:
        grey = await Sink("127.0.0.8", port, tempfail={"bob@b.test"}).start()
        resolver = StaticResolver(
            {
                "b.test": Route(
                    (
                        mx("mx1.b.test", "127.0.0.8", 10),
                        mx("mx2.b.test", "127.0.0.9", 20),
                    )
                )
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            await grey.stop()
        assert res.outcome is Outcome.TEMPORARY
        # The last real answer from a server wins over "connection refused".
        assert res.reply.status == "4.2.1"
        assert res.remote_mta == "mx1.b.test"

    run(main)


def test_connection_refused_everywhere() -> None:
    port = free_port()

    async def main() -> None:
        resolver = StaticResolver({"b.test": Route((mx("mx1.b.test", "127.0.0.9", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        assert res.outcome is Outcome.TEMPORARY
        assert res.reply.status == "4.4.1"
        assert "127.0.0.9" in res.reply.text
        # An address literal is named by its address, as Postfix does (recheck probe:
        # "connect to [127.0.0.9][127.0.0.9]:port").
        literal = StaticResolver({"[127.0.0.9]": Route((Target("[127.0.0.9]", ("127.0.0.9",)),))})
        remote = RemoteDelivery(config(port), literal, reply_timeout=5)
        (res,) = await remote.deliver("[127.0.0.9]", message("bob@[127.0.0.9]"), BODY)
        assert f"connect to 127.0.0.9[127.0.0.9]:{port}:" in res.reply.text, res.reply.text

    run(main)


def test_route_failures_and_loops_do_not_connect() -> None:
    port = free_port()

    async def main() -> None:
        resolver = StaticResolver(
            {
                "null.test": RouteFailure("5.1.10", "null MX"),
                "dns.test": RouteFailure("4.4.3", "SERVFAIL"),
                # The best MX has our own host name: a loop (RFC 5321 §5.1).
                "self.test": Route((mx("mx.a.test", "127.0.0.1", 10),)),
            }
        )
        remote = RemoteDelivery(config(port), resolver)
        outcomes: dict[str, DeliveryResult] = {}
        for domain in ("null.test", "dns.test", "self.test", "nx.test"):
            (outcomes[domain],) = await remote.deliver(domain, message(f"x@{domain}"), BODY)
        assert outcomes["null.test"].outcome is Outcome.PERMANENT
        assert outcomes["null.test"].reply.status == "5.1.10"
        assert outcomes["null.test"].reply.code == 556  # RFC 7504 §3
        assert outcomes["dns.test"].outcome is Outcome.TEMPORARY
        assert outcomes["self.test"].reply.status == "5.4.6"
        assert outcomes["nx.test"].reply.status == "5.1.2"
        assert all(r.remote_mta is None for r in outcomes.values())

    run(main)


WITH_UTF8 = {"extensions": ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")}
NO_UTF8: dict[str, Any] = {}  # the Sink's default EHLO has no SMTPUTF8


def through_mx_hosts(
    hosts: Sequence[dict[str, Any] | None], msg: OutgoingMessage, data: bytes = BODY
) -> tuple[list[DeliveryResult], list[Sink]]:
    """``msg`` to b.test, whose MX hosts mx1, mx2, ... (preference 10, 20, ...) are Sinks made
    with the given arguments on 127.0.0.5, .6, ... (None: nothing listens there). The
    results, and the sinks (stopped)."""
    port = free_port()
    out: list[DeliveryResult] = []
    sinks: list[Sink] = []

    async def main() -> None:
        ips = [f"127.0.0.{5 + n}" for n in range(len(hosts))]
        for ip, args in zip(ips, hosts, strict=True):
            if args is not None:
                sinks.append(await Sink(ip, port, **args).start())
        targets = tuple(mx(f"mx{n + 1}.b.test", ip, 10 * (n + 1)) for n, ip in enumerate(ips))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": Route(targets)}))
        try:
            out.extend(await remote.deliver("b.test", msg, data))
        finally:
            await remote.aclose()
            for sink in sinks:
                await sink.stop()

    run(main)
    return out, sinks


def test_a_host_without_smtputf8_leaves_the_message_to_the_next_one() -> None:
    """RFC 6531 §3.2: a message that needs SMTPUTF8 does not go to a server that lacks it;
    that is this server's shortcoming, not the domain's (RFC 5321 §5.1: the hosts are tried
    in order). The first MX host's missing SMTPUTF8 bounced the recipient at once (5.6.7)."""
    (bob, bob_utf8), (first, second) = through_mx_hosts(
        [NO_UTF8, WITH_UTF8], message("bob@b.test", "bøb@b.test")
    )
    assert bob.outcome is Outcome.DELIVERED and bob.remote_mta == "mx1.b.test"
    assert bob_utf8.outcome is Outcome.DELIVERED and bob_utf8.remote_mta == "mx2.b.test"
    assert [m.recipients for m in first.messages] == [["bob@b.test"]]
    assert [m.recipients for m in second.messages] == [["bøb@b.test"]]
    assert any(
        c.startswith("MAIL FROM:<alice@a.test>") and "SMTPUTF8" in c for c in second.commands
    )
    # UTF-8 header fields of a message given with SMTPUTF8 (5.6.9 at a host without it) too.
    utf8_head = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    msg = OutgoingMessage("alice@a.test", (Recipient("bob@b.test"),), smtputf8=True)
    (res,), (first, second) = through_mx_hosts([NO_UTF8, WITH_UTF8], msg, utf8_head)
    assert res.outcome is Outcome.DELIVERED and res.remote_mta == "mx2.b.test"
    assert first.messages == [] and len(second.messages) == 1


def test_without_smtputf8_at_every_host_the_recipient_bounces() -> None:
    (res,), sinks = through_mx_hosts([NO_UTF8, NO_UTF8], message("bøb@b.test"))
    assert res.outcome is Outcome.PERMANENT and res.reply.status == "5.6.7"
    # Our own words, naming the last host tried (the DSN: "Diagnostic-Code: X-Postroom; ...").
    assert res.reply.local and res.remote_mta is None and res.host == "mx2.b.test"
    assert res.reply.text.startswith("mx2.b.test[127.0.0.6]: the server does not offer SMTPUTF8")
    for sink in sinks:
        assert sink.connections == 1 and not any(c.startswith("MAIL") for c in sink.commands)
    # A host that refuses us for good (a 554 greeting) will never take it either.
    refused = {"greeting": b"554 5.7.1 no SMTP service for you"}
    (res,), _sinks = through_mx_hosts([NO_UTF8, refused], message("bøb@b.test"))
    assert res.outcome is Outcome.PERMANENT and res.reply.status == "5.6.7"


def test_the_bounce_for_smtputf8_lacking_everywhere_names_every_host_tried() -> None:
    """Its Diagnostic-Code (our words: no Remote-MTA, RFC 3464 §2.3.5) named only the last
    host tried, as if the others had never been asked."""
    (res,), _sinks = through_mx_hosts([NO_UTF8, NO_UTF8, NO_UTF8], message("bøb@b.test"))
    assert res.outcome is Outcome.PERMANENT and res.reply.status == "5.6.7"
    assert res.reply.local and res.remote_mta is None and res.host == "mx3.b.test"
    assert res.reply.text.startswith("mx3.b.test[127.0.0.7]: the server does not offer SMTPUTF8")
    assert res.reply.text.endswith(
        "; the other MX hosts tried lack what it needs too: "
        "mx1.b.test[127.0.0.5], mx2.b.test[127.0.0.6]"
    )


def test_a_host_not_reached_may_offer_smtputf8_so_the_message_waits() -> None:
    """One MX host lacks SMTPUTF8 and another cannot be asked now (connection refused, a 421
    greeting): that one may offer it once it answers, so the recipient is deferred, whatever
    the order of the two."""
    busy = {"greeting": b"421 4.3.2 busy"}
    for hosts in ([NO_UTF8, None], [None, NO_UTF8], [busy, NO_UTF8]):
        (res,), _sinks = through_mx_hosts(hosts, message("bøb@b.test"))
        assert res.outcome is Outcome.TEMPORARY, hosts
        assert res.reply.status in ("4.4.1", "4.3.2"), res.reply


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.b.test").configure_cert(ctx)
    return ctx


def test_a_refusal_by_the_last_host_tried_bounces() -> None:
    """RFC 5321 §3.1: a 554 greeting says "no SMTP service here" for good. From every host
    tried it bounces the message; a host that is only busy (421), before or after it, leaves
    the message queued (RFC 5321 §5.1: it MUST be retried; it bounced, though the preferred
    MX had only said "later", relay probe)."""
    port = free_port()

    async def attempt(
        *greetings: bytes, unreached: tuple[tuple[int, str], ...] = ()
    ) -> DeliveryResult:
        hosts = [f"127.0.0.{5 + i}" for i in range(len(greetings))]
        pairs = zip(hosts, greetings, strict=True)
        sinks = [await Sink(h, port, greeting=g).start() for h, g in pairs]
        targets = tuple(mx(f"mx{i}.b.test", h, 10 * (i + 1)) for i, h in enumerate(hosts))
        route = Route(targets, unreached=unreached)
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}))
        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            for sink in sinks:
                await sink.stop()
        return res

    async def main() -> None:
        refused = b"554 5.7.1 no SMTP service for you"
        alone = await attempt(refused)
        assert alone.outcome is Outcome.PERMANENT and alone.reply.code == 554
        assert alone.remote_mta == "mx0.b.test" and str(alone.reply) == refused.decode()
        then_busy = await attempt(refused, b"421 4.3.2 busy")
        assert then_busy.outcome is Outcome.TEMPORARY
        busy_then = await attempt(b"421 4.3.2 busy", refused)
        assert busy_then.outcome is Outcome.TEMPORARY and busy_then.reply.code == 421
        both = await attempt(refused, refused)
        assert both.outcome is Outcome.PERMANENT and both.remote_mta == "mx1.b.test"
        # An MX host whose address could not be looked up for now was not tried: it may
        # take the message later, before or after the refusing one (it bounced: relay probe).
        for pref in (5, 20):
            unresolved = await attempt(refused, unreached=((pref, "mx9.b.test"),))
            assert unresolved.outcome is Outcome.TEMPORARY, pref
            assert unresolved.reply.status == "4.4.3" and "mx9.b.test" in unresolved.reply.text

    run(main)


def test_opportunistic_starttls(ca: trustme.CA) -> None:
    res, sink = deliver_once(BODY, tls=server_tls(ca))
    assert res.outcome is Outcome.DELIVERED
    assert sink.messages[0].tls
    assert res.tls is not None and res.tls.startswith("TLSv1.")  # and its cipher, for the log
    assert [c.split()[0] for c in sink.commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]


def test_bytes_before_the_handshake_end_tls_and_the_retry_is_plaintext(ca: trustme.CA) -> None:
    """Plaintext behind the 220 to STARTTLS is refused (the client-side twin of CVE-2011-0411),
    as a failed handshake is: the next connection to that host goes without TLS, so such a
    server does not hold mail until it expires."""
    res, sink = deliver_once(BODY, tls=server_tls(ca), inject_after_starttls=True)
    assert res.outcome is Outcome.DELIVERED
    assert sink.connections == 2 and not sink.messages[0].tls and res.tls == "none"
    assert "250 injected" not in sink.commands
    assert [c.split()[0] for c in sink.commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]
    assert sink.commands[3].startswith("MAIL")  # the second connection's EHLO came before


@pytest.mark.parametrize(
    ("refusal", "outcome"),
    [(b"421 4.3.2 busy", Outcome.TEMPORARY), (b"554 5.7.1 go away", Outcome.PERMANENT)],
)
def test_a_refusal_to_ehlo_after_starttls_names_the_tls_it_came_over(
    ca: trustme.CA, refusal: bytes, outcome: Outcome
) -> None:
    """The host completes STARTTLS, then refuses EHLO: its reply came over TLS, and the
    result (the log line's tls) says with what, not "none" (plaintext)."""
    res, sink = deliver_once(BODY, tls=server_tls(ca), ehlo_in_tls=refusal)
    assert res.outcome is outcome and str(res.reply) == refusal.decode()
    assert res.tls is not None and res.tls.startswith("TLSv1.") and len(res.tls.split()) == 2
    assert [c.split()[0] for c in sink.commands] == ["EHLO", "STARTTLS", "EHLO"]


def test_the_tls_of_a_result_with_no_session_is_none_and_of_a_plaintext_one_plaintext() -> None:
    """None (no tls in the log line) when no connection was made; PLAINTEXT ("none") for a
    plaintext session, here one whose greeting was a 421."""
    port = free_port()

    async def main() -> None:
        busy = await Sink("127.0.0.2", port, greeting=b"421 4.3.2 busy").start()
        targets = (mx("mx.b.test", "127.0.0.2", 10), mx("mx.c.test", "127.0.0.3", 10))
        resolver = StaticResolver({"b.test": Route(targets[:1]), "c.test": Route(targets[1:])})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (greeted,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            (refused,) = await remote.deliver("c.test", message("carol@c.test"), BODY)
        finally:
            await remote.aclose()
            await busy.stop()
        assert greeted.outcome is Outcome.TEMPORARY and greeted.reply.code == 421
        assert greeted.tls == "none"  # (PLAINTEXT)
        assert refused.outcome is Outcome.TEMPORARY and refused.reply.status == "4.4.1"
        assert refused.ip == "127.0.0.3" and refused.tls is None

    run(main)


def test_a_dot_withheld_names_the_tls_of_its_session(ca: trustme.CA) -> None:
    """The log lines of recipients cut short at a host name the TLS of the session."""
    from postroom.delivery.remote import FENCED, DotWithheld

    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, tls=server_tls(ca)).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            with pytest.raises(DotWithheld) as withheld:
                await remote.deliver("b.test", message("bob@b.test"), BODY, lambda: False)
        finally:
            await remote.aclose()
            await sink.stop()
        assert withheld.value.reply == FENCED and withheld.value.where == "mx.b.test[127.0.0.2]"
        tls = withheld.value.tls
        assert tls is not None and tls.startswith("TLSv1.") and not sink.messages

    run(main)


def test_verified_tls_domain(ca: trustme.CA) -> None:
    port = free_port()

    def trusting(verify: bool) -> ssl.SSLContext:
        ctx = client_context(verify)
        ca.configure_trust(ctx)
        return ctx

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, tls=server_tls(ca)).start()
        plain = await Sink("127.0.0.3", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route((mx("mx.b.test", "127.0.0.2", 10),)),
                "c.test": Route((mx("mx.c.test", "127.0.0.3", 10),)),
            }
        )
        cfg = config(port, tls_verify_domains=("b.test", "c.test"))
        good = RemoteDelivery(cfg, resolver, tls_context=trusting, reply_timeout=5)
        untrusting = RemoteDelivery(cfg, resolver, reply_timeout=5)
        try:
            (ok,) = await good.deliver("b.test", message("bob@b.test"), BODY)
            (bad,) = await untrusting.deliver("b.test", message("bob@b.test"), BODY)
            (no_tls,) = await good.deliver("c.test", message("carol@c.test"), BODY)
        finally:
            await good.aclose()
            await untrusting.aclose()
            await sink.stop()
            await plain.stop()
        assert ok.outcome is Outcome.DELIVERED
        # The system trust store does not know our test CA: no plaintext fallback when verifying.
        assert bad.outcome is Outcome.TEMPORARY
        assert bad.reply.status == "4.7.5"
        # Our finding, in our words: a DSN must not say the host "said" it (no Remote-MTA).
        assert bad.reply.local and bad.remote_mta is None and "mx.b.test" in bad.reply.text
        assert no_tls.outcome is Outcome.TEMPORARY
        assert no_tls.reply.status == "4.7.5" and no_tls.reply.local
        assert len(sink.messages) == 1
        assert not plain.messages

    run(main)


def test_connection_is_reused_for_the_next_message() -> None:
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port).start()
        resolver = StaticResolver(
            {
                "b.test": Route((mx("mx.b.test", "127.0.0.2", 10),)),
                "c.test": Route((mx("mx.b.test", "127.0.0.2", 10),)),  # same MX host
            }
        )
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (first,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            assert remote.cached == 1
            (second,) = await remote.deliver("c.test", message("carol@c.test"), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        assert first.outcome is Outcome.DELIVERED
        assert second.outcome is Outcome.DELIVERED
        assert sink.connections == 1
        assert "RSET" not in sink.commands  # the reply to the dot ended the transaction
        assert sink.commands[-1] == "QUIT"
        assert [m.recipients for m in sink.messages] == [["bob@b.test"], ["carol@c.test"]]

    run(main)


def test_a_reload_ends_the_cached_sessions_with_quit() -> None:
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (first,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            assert first.outcome is Outcome.DELIVERED and remote.cached == 1
            remote.reconfigure(config(port), resolver)
            assert remote.cached == 0
            for _ in range(200):  # the QUIT is written at once; the sink reads it
                if sink.commands[-1:] == ["QUIT"]:
                    break
                await asyncio.sleep(0.01)
            assert sink.commands[-1] == "QUIT"
            # A session busy at the reload (opened under the old bind address, EHLO name)
            # is not kept for the next message either: it was, and reused for good.
            busy = asyncio.ensure_future(remote.deliver("b.test", message("bob@b.test"), BODY))
            while sink.connections < 2:
                await asyncio.sleep(0)
            remote.reconfigure(config(port), resolver)
            ((second,),) = await asyncio.gather(busy)
            assert second.outcome is Outcome.DELIVERED and remote.cached == 0
        finally:
            await remote.aclose()
            await sink.stop()

    run(main)


def test_stale_cached_connection_is_replaced() -> None:
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5, cache_idle=0.0)
        try:
            await remote.deliver("b.test", message("bob@b.test"), BODY)
            (second,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        assert second.outcome is Outcome.DELIVERED
        assert sink.connections == 2

    run(main)


@pytest.mark.parametrize("goodbye", [b"421 4.7.0 enough for this session, closing", None])
def test_a_cached_connection_the_server_dropped_costs_no_deferral(goodbye: bytes | None) -> None:
    # The server ends the session when the reused connection's next MAIL comes (a 421, or
    # just closing): the message goes to a new connection at once, delivered exactly once.
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, per_session=1, goodbye=goodbye).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            results = [
                await remote.deliver("b.test", message(f"u{i}@b.test"), BODY) for i in range(3)
            ]
        finally:
            await remote.aclose()
            await sink.stop()
        assert [r.outcome for (r,) in results] == [Outcome.DELIVERED] * 3
        assert [m.recipients for m in sink.messages] == [[f"u{i}@b.test"] for i in range(3)]
        assert sink.connections == 3

    run(main)


def test_relayed_dsn_owed_when_next_hop_lacks_dsn() -> None:
    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.2", port).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        msg = OutgoingMessage("alice@a.test", (Recipient("bob@b.test", notify=("SUCCESS",)),))
        try:
            (res,) = await remote.deliver("b.test", msg, BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        assert res.outcome is Outcome.DELIVERED
        assert needs_relayed_dsn(res)
        assert "NOTIFY" not in " ".join(sink.commands)

    run(main)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


def times_out(handler: Handler) -> None:
    """Deliver to one MX that runs ``handler`` (told by its event when the client is gone),
    with a 1 s reply limit: a temporary failure for the time-out within 5 s, never a hang."""
    port = free_port()

    async def main() -> None:
        gone, ended = asyncio.Event(), asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer, gone)
            except ConnectionError:
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                ended.set()

        server = await asyncio.start_server(serve, "127.0.0.8", port)
        resolver = StaticResolver({"b.test": Route((mx("mx1.b.test", "127.0.0.8", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=1)
        started = time.monotonic()
        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            gone.set()
            await asyncio.wait_for(ended.wait(), 5)
            server.close()
            await server.wait_closed()
        assert time.monotonic() - started < 5
        assert res.outcome is Outcome.TEMPORARY
        assert "time-out" in res.reply.text, res.reply

    run(main)


def test_a_server_that_stops_answering_times_out() -> None:
    # Greets, then never answers: the wait for its reply ends at the reply time-out with a
    # temporary failure (and the next host would be tried), never a hang.
    async def mute(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gone: asyncio.Event
    ) -> None:
        writer.write(b"220 mute.test ESMTP\r\n")
        await reader.read(1000)  # the EHLO, left unanswered
        await gone.wait()

    times_out(mute)


def test_a_server_that_drips_its_reply_times_out_all_the_same() -> None:
    # RFC 5321 §4.5.3.2 limits the wait for a reply, not the silence between two of its
    # bytes: a greeting sent one byte at a time held the delivery for as long as it went on.
    async def drip(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gone: asyncio.Event
    ) -> None:
        while not gone.is_set() and not reader.at_eof():
            for octet in b"220-drip\r\n":
                writer.write(bytes([octet]))
                await asyncio.sleep(0.1)

    times_out(drip)


class _SlowLink:
    """A transport whose buffer a slow peer drains ``step`` octets per ``every`` seconds,
    and the engine side of a session: what flush() uses of each."""

    def __init__(self, session: Any, size: int, step: int, every: float) -> None:
        self.session, self.buffered, self.step, self.every = session, 0, step, every
        self.size = size
        self.lost: list[str] = []

    # the engine
    def data_to_send(self) -> bytes:
        out, self.size = b"x" * self.size, 0
        return out

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)

    # the transport
    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        self.session.pause_writing()

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    async def drain(self) -> None:
        while not self.buffered:  # until the message is written
            await asyncio.sleep(0.001)
        while self.buffered:
            await asyncio.sleep(self.every)
            self.buffered = max(0, self.buffered - self.step)
        self.session.resume_writing()


@pytest.mark.parametrize(("step", "lost"), [(4096, False), (0, True)])
def test_the_data_block_time_out_is_per_block_not_per_message(step: int, lost: bool) -> None:
    """RFC 5321 §4.5.3.2.5: 3 minutes for each block the peer takes. The whole message had
    them: a large one over a slow link timed out at every attempt and never went out. A
    peer that takes nothing for that long is still given up on."""
    from postroom.delivery.remote import _Session

    async def main() -> list[str]:
        session = _Session(None, "mx.b.test", "127.0.0.2", cap=0.1)  # type: ignore[arg-type]
        link = _SlowLink(session, 64 * 1024, step, every=0.02)  # 16 steps: 0.3 s in all
        session.engine, session.transport = link, link  # type: ignore[assignment]
        draining = asyncio.ensure_future(link.drain())
        await asyncio.wait_for(session.flush(), 5)
        draining.cancel()
        return link.lost

    assert bool(asyncio.run(main())) is lost


def test_an_error_of_ours_with_one_host_closes_its_session(monkeypatch: Any) -> None:
    # An error of ours after the session was open (a message it cannot convert) moved on to
    # the next host and left the session open: no QUIT, never closed, even by aclose().
    from postroom.delivery import remote as remote_module

    def broken(data: bytes, *, eight_bit: bool) -> bytes:
        raise RuntimeError("a bug of ours with this message")

    monkeypatch.setattr(remote_module.mime_downgrade, "downgrade", broken)
    port = free_port()
    hosts = ("127.0.0.5", "127.0.0.6")

    async def main() -> None:
        open_now = dict.fromkeys(hosts, 0)
        sinks = []
        for ip in hosts:
            sink = Sink(ip, port)
            handle = sink._handle

            async def counted(reader: Any, writer: Any, handle: Any = handle, ip: str = ip) -> None:
                open_now[ip] += 1
                try:
                    await handle(reader, writer)
                finally:
                    open_now[ip] -= 1

            sink._handle = counted  # type: ignore[method-assign]
            sinks.append(await sink.start())
        route = Route(tuple(mx(f"mx{i}.b.test", ip, 10 * i) for i, ip in enumerate(hosts)))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}), reply_timeout=5)
        try:
            (res,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            assert res.outcome is Outcome.TEMPORARY and "local error" in str(res.reply)
            deadline = time.monotonic() + 5
            while any(open_now.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert open_now == dict.fromkeys(hosts, 0)
            assert all(s.commands[-1] == "QUIT" for s in sinks)
        finally:
            await remote.aclose()
            for s in sinks:
                await s.stop()

    run(main)


def test_a_cached_session_dropped_while_a_large_message_is_converted_gets_a_new_one(
    monkeypatch: Any,
) -> None:
    # The host closed the cached connection (its idle time-out, a 421) while a large message
    # was being converted in a thread: the host was failed, the message deferred, instead of
    # going to a new connection at once as for any connection dropped while cached.
    from postroom.delivery import remote as remote_module

    real = remote_module.mime_downgrade.downgrade
    dropped = threading.Event()

    def slow(data: bytes, *, eight_bit: bool) -> bytes:
        if len(data) > remote_module.OFF_LOOP:
            dropped.wait(10)  # (in its thread) until the host has closed the cached one
        return real(data, eight_bit=eight_bit)

    monkeypatch.setattr(remote_module.mime_downgrade, "downgrade", slow)
    port = free_port()
    connections: list[asyncio.StreamWriter] = []
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                body = b""
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    body += chunk
                received.append(body)
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.5", port)
        route = Route((mx("mx.b.test", "127.0.0.5", 10),))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}), reply_timeout=5)
        try:
            (first,) = await remote.deliver("b.test", message("bob@b.test"), BODY)
            assert first.outcome is Outcome.DELIVERED
            big = b"Subject: 2\r\n\r\n" + (b"x" * 70 + b"\r\n") * 5000
            second = asyncio.ensure_future(remote.deliver("b.test", message("bob@b.test"), big))
            await asyncio.sleep(0.2)  # converting now: the host's idle time-out comes
            connections[0].write(b"421 4.4.2 sink Error: timeout exceeded\r\n")
            connections[0].close()
            await asyncio.sleep(0.2)
            dropped.set()
            (res,) = await second
            assert res.outcome is Outcome.DELIVERED, res.reply
            assert len(connections) == 2 and len(received) == 2
        finally:
            await remote.aclose()
            server.close()

    run(main)


def test_a_cancel_while_waiting_for_the_rset_reply_closes_the_session() -> None:
    # After a failed transaction the session waits for its RSET's reply before it is
    # cached; a cancel there (a lease lost by another domain of the attempt, a stop) left
    # the connection open until the host timed out.
    port = free_port()
    seen: dict[str, int] = {"rset": 0, "eof": 0}

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"RSET":
                seen["rset"] += 1  # never answered
            elif verb == b"RCPT":
                writer.write(b"451 4.7.1 later\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        seen["eof"] += 1
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(stall, "127.0.0.5", port)
        route = Route((mx("mx.b.test", "127.0.0.5", 10),))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}), reply_timeout=5)
        try:
            task = asyncio.ensure_future(remote.deliver("b.test", message("bob@b.test"), BODY))
            deadline = time.monotonic() + 5
            while not seen["rset"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert seen["rset"] == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 5
            while not seen["eof"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert seen["eof"] == 1
        finally:
            await remote.aclose()
            server.close()

    run(main)


def test_a_delivery_that_finds_the_stop_begun_dials_no_host() -> None:
    # A delivery that waited for its destination slot, or went on to a backup host, after
    # the stop had begun still connected and sent the whole message (only its dot held back).
    from postroom.delivery.remote import NOT_TRIED, DotWithheld

    port = free_port()

    async def main() -> None:
        sink = await Sink("127.0.0.5", port).start()
        route = Route((mx("mx.b.test", "127.0.0.5", 10),))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}), reply_timeout=5)
        remote.stopping = True
        try:
            with pytest.raises(DotWithheld) as withheld:
                await remote.deliver("b.test", message("bob@b.test"), BODY)
        finally:
            await remote.aclose()
            await sink.stop()
        assert withheld.value.reply == NOT_TRIED
        assert sink.connections == 0

    run(main)


def test_a_stop_after_a_refusing_host_leaves_the_message_for_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MX 10 greets 554, and the server stops before it dials MX 20: the 554 was put in
    ``final`` as it stood, and the message bounced, though MX 20 was never asked (recheck
    probe). What the refusing host said is kept, for now only."""
    from postroom.delivery import remote as remote_module
    from postroom.delivery.remote import DotWithheld

    port = free_port()
    final: dict[int, DeliveryResult] = {}

    async def main() -> None:
        refusing = await Sink("127.0.0.5", port, greeting=b"554 5.7.1 go away").start()
        backup = await Sink("127.0.0.6", port).start()
        route = Route((mx("mx1.b.test", "127.0.0.5", 10), mx("mx2.b.test", "127.0.0.6", 20)))
        remote = RemoteDelivery(config(port), StaticResolver({"b.test": route}), reply_timeout=5)

        def stop_now(*_args: object) -> None:
            remote.stopping = True  # SIGTERM, between the two hosts

        monkeypatch.setattr(remote_module.events, "host_failed", stop_now)
        try:
            with pytest.raises(DotWithheld):
                await remote.deliver("b.test", message("bob@b.test"), BODY, final=final)
        finally:
            await remote.aclose()
            await refusing.stop()
            await backup.stop()
        assert backup.connections == 0

    run(main)
    assert final[0].outcome is Outcome.TEMPORARY and final[0].reply.code == 554
