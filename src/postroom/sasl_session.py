"""The SASL exchange of one SMTP or POP3 session: :mod:`postroom.sasl`'s mechanisms driven
against the account store, with the login throttle. Used by both servers, so that AUTH behaves
the same in SMTP (RFC 4954) and POP3 (RFC 5034); each maps the outcome to its own replies.

Security: while a client IP is locked out no credential is even checked (a SCRAM proof is
tested against the lockout when it arrives, as a password is when its turn comes); every failed
login (an unknown user and a wrong password alike) waits out the throttle's delay before it is
answered, and is counted per IP and per account name (case-insensitive, so that spelling the
name differently does not reset the count). An unknown SCRAM user gets made-up keys from
``sasl.py`` and fails only at the proof. Failed logins (with the name tried, never the
password or the SASL exchange) and lockouts are reported here (:mod:`postroom.events`).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from postroom import events, sasl
from postroom.address import parse_user_address
from postroom.errors import AddressError, LockedOut, PasswordUncheckable
from postroom.wire.events import AuthResponse, AuthStart

if TYPE_CHECKING:
    from postroom.services import Services


@dataclass(frozen=True, slots=True)
class Refused:
    """The exchange ended without a login. ``throttled``: the IP is locked out; ``mechanism``:
    unknown; ``malformed``: the client broke the mechanism's syntax; ``credentials``: wrong
    (the throttle's delay has been waited out already); ``unavailable``: the password could
    not be checked (ours, not the client's: no failure counted)."""

    reason: Literal["throttled", "mechanism", "malformed", "credentials", "unavailable"]


Outcome = sasl.Challenge | sasl.Success | Refused


def _account(username: str | None) -> str | None:
    """The account whose failures a login counts: its key, however the name is spelled
    ("Alice@A.test.", a quoted local part), or else the name as tried."""
    if not username:
        return None
    try:
        return parse_user_address(username).key
    except AddressError:
        return username.strip().lower()[:320]


class SaslSession:
    """Feeds AuthStart/AuthResponse events to a mechanism until it succeeds or fails."""

    def __init__(self, services: Services, client_ip: str, service: str) -> None:
        self.services = services
        self.client_ip = client_ip
        self.service = service  # the listener, for the logs and metrics
        self.mechanism = "USER"  # the last one started (POP3 USER/PASS is none)
        self._mech: sasl.Mechanism | None = None

    def locked_out(self) -> bool:
        """The client's IP failed too often: refuse without checking anything."""
        if self.services.throttle.refused(self.client_ip):
            events.login_throttled(self.service, self.client_ip)
            return True
        return False

    async def step(self, event: AuthStart | AuthResponse) -> Outcome:
        """One step: a challenge to send (``sasl.Challenge``, SCRAM's server-final included),
        the user logged in (``sasl.Success``), or :class:`Refused`."""
        services = self.services
        if isinstance(event, AuthStart):
            if self.locked_out():
                return Refused("throttled")
            self.mechanism = event.mechanism.upper()[:32]
            self._mech = sasl.new_mechanism(event.mechanism, services.accounts.decoy_secret)
            if self._mech is None:
                return Refused("mechanism")
            step = self._mech.start(event.initial)
        else:
            if self._mech is None:
                return Refused("malformed")
            # A SCRAM proof is a password check (PLAIN's and LOGIN's go through
            # check_password): tested against the lockout now, when it comes, not only at the
            # start, or connections opened early would each get a guess past it. So is the
            # client-first: the keys it gets are the account's, whatever the lockout (made-up
            # ones for a real account told who exists). Not the last, empty answer: the
            # proof was right, and the server-final has said so.
            if (
                isinstance(self._mech, sasl.ScramSha256)
                and self._mech.deciding
                and self.locked_out()
            ):
                self._mech = None
                return Refused("throttled")
            step = self._mech.step(event.data)
        try:
            step = await sasl.settle(
                self._mech,
                step,
                functools.partial(services.check_password, self.client_ip),
                services.scram_keys,
            )
        except LockedOut:  # while its check waited: not the password's fault
            self._mech = None
            events.login_throttled(self.service, self.client_ip)
            return Refused("throttled")
        except PasswordUncheckable:
            self._mech = None
            return Refused("unavailable")
        if isinstance(step, sasl.Challenge):
            return step
        if isinstance(step, sasl.Success):
            if step.final is not None:
                # RFC 4954 §4, RFC 5034 §4: SCRAM's server-final goes out as a challenge; the
                # client's (empty) answer then completes the mechanism with a plain Success.
                return sasl.Challenge(step.final)
            self._mech = None
            return step
        self._mech = None
        if step.malformed:
            return Refused("malformed")
        await self.failed(step.username)
        return Refused("credentials")

    async def failed(self, username: str | None) -> None:
        """Count a failed login (SASL or POP3 USER/PASS) and wait out the throttle's delay."""
        tried = username.strip().lower()[:320] if username else None
        delay = self.services.throttle.failure(self.client_ip, _account(username))
        events.auth_failed(self.service, self.client_ip, tried, self.mechanism)
        await asyncio.sleep(delay)
