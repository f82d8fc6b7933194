"""asyncio glue for the SMTP listeners (25, 587 with STARTTLS; 465 with implicit TLS, RFC 8314).

Thin on purpose: the protocol lives in ``server_engine.py``, the policy in ``policy.py``, and
what every connection needs (limits, flow control, TLS, time-outs, shutdown) in
:mod:`postroom.connection`. This module turns the engine's events into the policy's answers.
Almost all are answered right inside ``data_received``; only the end of a message (the durable
write) and AUTH (argon2) wait, as a task, while further input is buffered by the engine, not
read. This keeps a transaction to a handful of Python calls: no task switch per command.
Time-outs are those of RFC 5321 §4.5.3.2 (``[limits]``), applied by :class:`IdleSweeper`, one
periodic check for all connections instead of a timer per command.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from postroom import sasl
from postroom.connection import Connection
from postroom.sasl_session import SaslSession
from postroom.smtp.policy import Port, SmtpPolicy
from postroom.smtp.server_engine import (
    DataChunk,
    DataStart,
    HelloReceived,
    MailFrom,
    MessageAborted,
    MessageEnd,
    RcptTo,
    Refused,
    ServerEngine,
    TransactionReset,
)
from postroom.wire import replies
from postroom.wire.events import AuthResponse, AuthStart

if TYPE_CHECKING:
    from postroom.services import Services

_SASL_REFUSED = {
    "throttled": replies.AUTH_THROTTLED,
    "mechanism": replies.AUTH_BAD_MECH,
    "malformed": replies.AUTH_MALFORMED,
    "credentials": replies.AUTH_FAILED,
    "unavailable": replies.AUTH_UNAVAILABLE,
}


class SmtpConnection(Connection):
    """One SMTP client connection."""

    kind = "SMTP"
    read_high_water = 1 << 20

    engine: ServerEngine | None

    def __init__(self, services: Services, port: Port, implicit_tls: bool) -> None:
        super().__init__(services, implicit_tls)
        self.port = self.service = port
        self.session: SmtpPolicy | None = None
        self._sasl: SaslSession | None = None

    def refusal(self) -> bytes:
        return replies.TOO_MANY_CONNECTIONS.render()

    def begin(self) -> bytes:
        self.session = SmtpPolicy(self.services, self.port, self.client_ip, tls=self.implicit_tls)
        self.engine = ServerEngine(self.session.features(), tls_active=self.implicit_tls)
        self._sasl = SaslSession(self.services, self.client_ip, self.port)
        return self.services.banner

    def handle(self, event: object) -> Coroutine[Any, Any, None] | None:
        engine, session = self.engine, self.session
        assert engine is not None and session is not None
        if isinstance(event, DataChunk):
            session.on_data(event.data)
        elif isinstance(event, RcptTo):
            engine.reply(session.on_rcpt(event.command))
        elif isinstance(event, MailFrom):
            engine.reply(session.on_mail(event.command))
        elif isinstance(event, DataStart):
            session.on_data_start()
        elif isinstance(event, MessageAborted):
            session.refused(event.reply)  # too big, bare CR or LF, NUL
            session.reset()
        elif isinstance(event, Refused):
            session.refused(event.reply, event.command)
        elif isinstance(event, TransactionReset):
            session.reset()
        elif isinstance(event, HelloReceived):
            session.reset()
            session.helo, session.extended = event.domain, event.extended
        elif isinstance(event, MessageEnd):
            return self._message_end(engine, session)
        elif isinstance(event, AuthStart | AuthResponse):
            return self._auth(engine, session, event)
        return None

    async def _message_end(self, engine: ServerEngine, session: SmtpPolicy) -> None:
        session.tls_version = self.tls_version
        engine.reply(await session.on_message_end(lambda: self._lost))

    async def _auth(
        self, engine: ServerEngine, session: SmtpPolicy, event: AuthStart | AuthResponse
    ) -> None:
        assert self._sasl is not None
        outcome = await self._sasl.step(event)
        if isinstance(outcome, sasl.Challenge):
            engine.auth_challenge(outcome.data)
        elif isinstance(outcome, sasl.Success):
            session.authenticated(outcome.username, self._sasl.mechanism)
            engine.auth_finish(replies.AUTH_OK)
        else:
            engine.auth_finish(_SASL_REFUSED[outcome.reason])

    def tls_started(self) -> None:
        assert self.engine is not None and self.session is not None
        self.session.tls_started(self.engine)

    def final_words(self, why: str) -> None:
        assert self.engine is not None
        reply = {"timeout": replies.TIMEOUT, "shutdown": replies.SHUTTING_DOWN}
        self.engine.close(reply.get(why, replies.LOCAL_ERROR))

    def idle_limit(self) -> float:
        assert self.engine is not None
        return self.limits.data_timeout if self.engine.receiving else self.limits.command_timeout

    def session_limit(self) -> float | None:
        return self.limits.session_timeout

    def busy(self) -> bool:
        engine = self.engine
        return engine is not None and engine.receiving

    def holds_message(self) -> bool:
        engine = self.engine
        return engine is not None and engine.in_message

    def cut_task_short(self) -> bool:
        session, task = self.session, self._task
        if session is None or task is None or not session.checking:
            return False  # (storing a message is waited for: its 250 must follow)
        self.log.info(
            "%s with %s: cut off by the stop while its message was checked",
            self.kind,
            self.client_ip,
        )
        session.cut_by_the_stop = True
        task.cancel()  # (on_message_end answers 451, then the stop's 421 closes the session)
        return True

    def released(self) -> None:
        if self.session is not None:
            self.session.reset()
