"""A threaded SMTP sink for integration tests: answers each RCPT by the local part's prefix,
offers the EHLO keywords it is given (with CHUNKING it takes BDAT, RFC 3030; given a ``tls``
context, STARTTLS, RFC 3207), and keeps the MAIL commands, the messages and how each message
came (DATA or BDAT; and the TLS version and cipher of each STARTTLS session)."""

from __future__ import annotations

import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from tests.conftest import free_port
from tests.dnszone import LoopbackDNS

if TYPE_CHECKING:
    from tests.conftest import Server, ServerFactory

GMAIL_526 = (
    "550-5.7.26 This mail has been blocked because the sender is unauthenticated.\r\n"
    "550 5.7.26 Gmail requires all senders to authenticate with either SPF or DKIM."
)
# Local part prefix -> the RCPT reply; anything else gets 250.
RULES = {
    "auth": GMAIL_526,
    "grey": "451 4.7.1 Greylisted, please try again later",
    "gone": "550 5.1.1 no such user",
}


class _Handler(socketserver.StreamRequestHandler):
    timeout = 20

    def handle(self) -> None:
        def say(text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")
            self.wfile.flush()

        server: _Server = self.server  # type: ignore[assignment]
        say("220 sink.test ESMTP")
        rcpts = 0
        chunks: list[bytes] = []  # BDAT chunks of the current transaction
        secure = False
        while line := self.rfile.readline(4096):
            verb = line[:4].decode("ascii", "replace").upper()
            if verb in ("EHLO", "HELO") and secure and server.ehlo_in_tls is not None:
                say(server.ehlo_in_tls)  # (and hangs up)
                return
            if verb in ("EHLO", "HELO"):
                offered = server.extensions + (("STARTTLS",) if server.tls and not secure else ())
                extra = "".join(f"250-{keyword}\r\n" for keyword in offered)
                say(f"250-sink.test\r\n250-PIPELINING\r\n{extra}250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                rcpts = 0
                chunks = []
                server.mails.append(line.decode("utf-8", "replace").rstrip("\r\n"))
                say("250 2.1.0 ok")
            elif verb == "RCPT":
                local = line.decode("utf-8", "replace").split("<", 1)[1].split("@")[0]
                reply = next((r for p, r in RULES.items() if local.startswith(p)), None)
                if reply is None:
                    rcpts += 1
                say(reply or "250 2.1.5 ok")
            elif verb == "BDAT" and "CHUNKING" in server.extensions:
                # RFC 3030 §2: the octets are read even when the command is refused.
                size, *last = line.decode("ascii", "replace").split()[1:]
                chunks.append(self.rfile.read(int(size)))
                if not rcpts:
                    say("554 5.5.1 no valid recipients")
                elif last:
                    server.received.append(b"".join(chunks))
                    server.ways.append("BDAT")
                    say("250 2.0.0 queued as SINK1")
                else:
                    say(f"250 2.0.0 {size} octets received")
            elif verb == "DATA":
                if not rcpts:
                    say("554 5.5.1 no valid recipients")
                    continue
                say("354 go ahead")
                lines = []
                while (chunk := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    lines.append(chunk)
                server.received.append(b"".join(lines))
                server.ways.append("DATA")
                say("250 2.0.0 queued as SINK1")
            elif verb == "STAR" and server.tls is not None and not secure:
                say("220 2.0.0 go ahead")
                conn = server.tls.wrap_socket(self.request, server_side=True)
                self.request, secure = conn, True
                self.rfile, self.wfile = conn.makefile("rb"), conn.makefile("wb")
                server.sessions.append(f"{conn.version()} {(conn.cipher() or ('',))[0]}")
            elif verb == "QUIT":
                say("221 2.0.0 bye")
                return
            else:
                say("250 2.0.0 ok")

    def finish(self) -> None:
        super().finish()
        if isinstance(self.request, ssl.SSLSocket):  # (the server closes the plain one)
            self.request.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    extensions: tuple[str, ...] = ()
    tls: ssl.SSLContext | None = None  # set: STARTTLS is offered
    ehlo_in_tls: str | None = None  # set: the reply to EHLO after STARTTLS, then it hangs up
    sessions: list[str]  # "TLSv1.3 TLS_AES_256_GCM_SHA384" of each STARTTLS session
    mails: list[str]  # the MAIL commands, as sent
    received: list[bytes]  # the messages, still dot-stuffed (if they came with DATA)
    ways: list[str]  # how each message came: "DATA" or "BDAT"


@contextmanager
def smtp_sink(
    host: str = "127.0.0.1", extensions: tuple[str, ...] = (), port: int = 0
) -> Iterator[_Server]:
    """A sink on ``host`` (on ``port``, or any free port) whose EHLO offers ``extensions``
    besides PIPELINING and ENHANCEDSTATUSCODES."""
    server = _Server((host, port), _Handler)
    server.extensions = extensions
    server.mails = []
    server.received = []
    server.ways = []
    server.sessions = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def relay_to_sink(
    server_factory: ServerFactory, extensions: tuple[str, ...] = (), extra_toml: str = ""
) -> Iterator[tuple[Server, _Server]]:
    """A server (smtp only) whose ``fwd@a.test`` goes to ``bob@b.test``, which a loopback DNS
    routes to a sink offering ``extensions``; ``alice@a.test`` is a user, to send as;
    ``extra_toml``: more of its configuration (top-level keys)."""
    with relay_to_sinks(server_factory, extensions, extra_toml=extra_toml) as (srv, (sink,)):
        yield srv, sink


def _sinks_on_one_port(stack: ExitStack, extensions: tuple[tuple[str, ...], ...]) -> list[_Server]:
    """One sink per entry of ``extensions``, on 127.0.0.1, 127.0.0.2, ..., all on one port
    (remote delivery dials every MX host on ``[delivery] port``)."""
    for _ in range(20):
        port = free_port()
        attempt = ExitStack()
        try:
            sinks = [
                attempt.enter_context(smtp_sink(f"127.0.0.{n + 1}", ext, port))
                for n, ext in enumerate(extensions)
            ]
        except OSError:  # the port is taken on another of the addresses: another port
            attempt.close()
            continue
        stack.enter_context(attempt)
        return sinks
    raise RuntimeError("no port free on every sink address")


@contextmanager
def relay_to_sinks(
    server_factory: ServerFactory,
    *extensions: tuple[str, ...],
    target: str = "bob@b.test",
    extra_toml: str = "",
) -> Iterator[tuple[Server, list[_Server]]]:
    """A server (smtp only) whose ``fwd@a.test`` goes to ``target`` at b.test, which a
    loopback DNS routes to one sink per entry of ``extensions`` (the EHLO keywords it offers):
    mx1.b.test at preference 10 on 127.0.0.1, mx2.b.test at 20 on 127.0.0.2, ...; ``alice@a.test``
    is a user, to send as."""
    dns = LoopbackDNS()
    with ExitStack() as stack:
        stack.callback(dns.stop)
        sinks = _sinks_on_one_port(stack, extensions)
        for n in range(len(sinks)):
            name = f"mx{n + 1}.b.test" if len(sinks) > 1 else "mx.b.test"
            dns.mx("b.test", 10 * (n + 1), name)
            dns.a(name, f"127.0.0.{n + 1}")
        srv = server_factory(
            services=("smtp",),
            extra_toml=(
                f"{extra_toml}"
                f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
                f'[delivery]\nport = {sinks[0].server_address[1]}\nconnect_timeout = "3s"\n'
            ),
        )
        srv.add_user("alice@a.test", "alice-pw")
        srv.cli("alias", "add", "fwd@a.test", target)
        yield srv, sinks
