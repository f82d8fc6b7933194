"""Before a TLS handshake: answer a TLS 1.0/1.1-only client with a ``protocol_version`` alert.

:func:`refuses_old_tls` peeks (``MSG_PEEK`` on a duplicate of the connection's descriptor,
with the transport's reading paused) at the client's first record until
:mod:`postroom.clienthello` can tell; an old hello gets the alert and the connection is
closed, anything else is left unread for the TLS layer. Used before STARTTLS/STLS, and by
:class:`ImplicitTLSListener`, which accepts on the implicit-TLS listeners (465, 995) itself:
the gate runs on the bare socket, before any transport exists (a paused transport is not
enough: uvloop reads after ``connection_made`` whatever it was told), then
``connect_accepted_socket`` does the handshake. The context is read from the services at each
connection, so a reloaded pair is used at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

from postroom import clienthello

log = logging.getLogger("postroom")


async def _old_hello(raw_fd: int, timeout: float) -> bytes | None:
    """Peek at the client's first octets on (a duplicate of) ``raw_fd`` until
    :mod:`postroom.clienthello` can tell; the octets if they are a TLS 1.0/1.1-only hello,
    else None (also at a time-out or an error: the handshake then deals with it)."""
    loop = asyncio.get_running_loop()
    peek = socket.socket(fileno=os.dup(raw_fd))
    peek.setblocking(False)
    readable = asyncio.Event()
    loop.add_reader(peek.fileno(), readable.set)
    try:
        deadline = loop.time() + timeout
        while True:
            try:
                data = peek.recv(clienthello.MAX_RECORD, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError:
                return None
            if data == b"":
                return None  # closed by the client
            if data is not None:
                verdict = clienthello.too_old(data)
                if verdict is not None:
                    return data if verdict else None
            readable.clear()
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readable.wait(), left)
    finally:
        loop.remove_reader(peek.fileno())
        peek.close()


async def refuses_old_tls(transport: asyncio.BaseTransport, timeout: float) -> bool:
    """Before STARTTLS/STLS (reading paused): True if the client offered only TLS < 1.2;
    the alert is sent and the transport closed."""
    raw = transport.get_extra_info("socket")
    hello = None if raw is None else await _old_hello(raw.fileno(), timeout)
    if hello is None:
        return False
    # RFC 8446 §6.2 / RFC 8996: refuse with protocol_version, not a bare close.
    transport.write(clienthello.protocol_version_alert(hello))  # type: ignore[attr-defined]
    transport.close()
    return True


class ImplicitTLSListener:
    """Accepts on an implicit-TLS listening socket (465, 995): the gate on the bare socket,
    then ``connect_accepted_socket`` with the TLS context of the moment (a reloaded pair is
    used at once) and ``factory``'s protocol, as ``create_server(ssl=...)`` would."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        context: Callable[[], ssl.SSLContext | None],
        handshake_timeout: float,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.context = context
        self.timeout = handshake_timeout
        self._pending: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: wait for descriptors to come back
                log.warning("accept on %s failed: %s", self.sock.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._start(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            hello = await _old_hello(conn.fileno(), self.timeout)
            if hello is not None:
                with contextlib.suppress(OSError):
                    conn.send(clienthello.protocol_version_alert(hello))
                conn.close()
                return
            ctx = self.context()
            if ctx is None:
                conn.close()
                return
            await asyncio.get_running_loop().connect_accepted_socket(
                self.factory, conn, ssl=ctx, ssl_handshake_timeout=self.timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            conn.close()  # a failed handshake: nothing to say over TLS that did not start

    def close(self) -> None:
        self._task.cancel()
        for task in list(self._pending):
            task.cancel()
