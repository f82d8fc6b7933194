"""The SASL exchange both servers share, against a fake account store and throttle."""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from postroom import sasl
from postroom.errors import LockedOut, PasswordUncheckable
from postroom.sasl_session import Refused, SaslSession
from postroom.wire.events import AuthResponse, AuthStart
from tests.unit.test_sasl import client_final


@dataclass
class FakeThrottle:
    locked: bool = False
    failures: list[tuple[str, str | None]] = field(default_factory=list)

    def refused(self, ip: str) -> bool:
        return self.locked

    def failure(self, ip: str, account: str | None) -> float:
        self.failures.append((ip, account))
        return 0.0


@dataclass
class FakeServices:
    throttle: FakeThrottle = field(default_factory=FakeThrottle)
    log: logging.Logger = logging.getLogger("test")
    accounts: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(decoy_secret=b"s"))

    async def check_password(self, ip: str, login: str, password: str) -> str | None:
        return "alice@a.test" if (login, password) == ("Alice@A.test", "pw") else None

    def scram_keys(self, login: str) -> sasl.ScramKeys | None:
        return None


def session(services: FakeServices) -> SaslSession:
    return SaslSession(cast(Any, services), "192.0.2.1", "smtp")


def test_plain_success_and_failure_with_the_throttle_counting() -> None:
    services = FakeServices()
    ok = asyncio.run(session(services).step(AuthStart("PLAIN", b"\0Alice@A.test\0pw")))
    assert ok == sasl.Success("alice@a.test") and services.throttle.failures == []
    bad = asyncio.run(session(services).step(AuthStart("PLAIN", b"\0Alice@A.test\0no")))
    assert bad == Refused("credentials")
    assert services.throttle.failures == [("192.0.2.1", "alice@a.test")]  # case-insensitive


def test_login_mechanism_takes_two_challenges() -> None:
    services = FakeServices()
    s = session(services)

    async def run() -> list[object]:
        return [
            await s.step(AuthStart("LOGIN", None)),
            await s.step(AuthResponse(b"Alice@A.test")),
            await s.step(AuthResponse(b"pw")),
        ]

    first, second, third = asyncio.run(run())
    assert isinstance(first, sasl.Challenge) and base64.b64encode(first.data)
    assert isinstance(second, sasl.Challenge) and third == sasl.Success("alice@a.test")


def test_refusals_throttled_unknown_mechanism_malformed() -> None:
    services = FakeServices(FakeThrottle(locked=True))
    assert asyncio.run(session(services).step(AuthStart("PLAIN", None))) == Refused("throttled")
    services.throttle.locked = False
    assert asyncio.run(session(services).step(AuthStart("X-NONE", None))) == Refused("mechanism")
    malformed = asyncio.run(session(services).step(AuthStart("PLAIN", b"no nuls")))
    assert malformed == Refused("malformed") and services.throttle.failures == []
    # A response with no exchange going on is malformed, not a crash.
    assert asyncio.run(session(services).step(AuthResponse(b"x"))) == Refused("malformed")


def test_a_lockout_that_began_while_the_check_waited_is_a_throttle_not_a_failure() -> None:
    # A right password queued behind guesses from the same IP was answered "wrong" (535 /
    # [AUTH]) and counted as one more failure when the lockout came before its turn.
    class LockedWhileWaiting(FakeServices):
        async def check_password(self, ip: str, login: str, password: str) -> str | None:
            raise LockedOut(ip)

    services = LockedWhileWaiting()
    refused = asyncio.run(session(services).step(AuthStart("PLAIN", b"\0Alice@A.test\0pw")))
    assert refused == Refused("throttled") and services.throttle.failures == []


class ScramServices(FakeServices):
    """alice's password is "pw"."""

    def scram_keys(self, login: str) -> sasl.ScramKeys | None:
        return sasl.derive_scram_keys("pw", b"salt" * 4, 4096)


async def scram_login(
    locked_meanwhile: bool, services: ScramServices | None = None
) -> tuple[object, SaslSession, FakeThrottle]:
    """A SCRAM exchange with the right password up to the server-final; the IP is locked out
    (or not) by other connections between the client-first and the proof."""
    services = services or ScramServices()
    s = session(services)
    first_bare = "n=alice@a.test,r=abc"
    server_first = await s.step(AuthStart("SCRAM-SHA-256", b"n,," + first_bare.encode()))
    assert isinstance(server_first, sasl.Challenge)
    services.throttle.locked = locked_meanwhile
    outcome = await s.step(AuthResponse(client_final(first_bare, server_first.data.decode(), "pw")))
    return outcome, s, services.throttle


def test_a_scram_proof_is_tested_against_the_lockout_when_it_comes() -> None:
    """Connections that sent their client-first before the lockout get no guess past it: the
    proof is a password check, refused unchecked once the IP is locked out."""
    outcome, _s, throttle = asyncio.run(scram_login(locked_meanwhile=True))
    assert outcome == Refused("throttled") and throttle.failures == []
    outcome, _s, _t = asyncio.run(scram_login(locked_meanwhile=False))
    assert isinstance(outcome, sasl.Challenge) and outcome.data.startswith(b"v=")


def test_a_password_that_could_not_be_checked_is_no_failed_login() -> None:
    """argon2 out of memory: a temporary refusal (454 4.7.0, POP3 [SYS/TEMP]), not 535, and
    no failure counted towards the lockout."""

    class Failing(FakeServices):
        async def check_password(self, ip: str, login: str, password: str) -> str | None:
            raise PasswordUncheckable("Memory allocation error")

    services = Failing()
    for start in (AuthStart("PLAIN", b"\0Alice@A.test\0pw"), AuthStart("LOGIN", b"Alice@A.test")):
        s = session(services)

        async def run(first: AuthStart, s: SaslSession = s) -> object:
            step = await s.step(first)
            return (
                step if not isinstance(step, sasl.Challenge) else await s.step(AuthResponse(b"pw"))
            )

        assert asyncio.run(run(start)) == Refused("unavailable")
    assert services.throttle.failures == []


def test_a_scram_client_first_is_refused_during_a_lockout_not_answered_with_made_up_keys() -> None:
    """AUTH SCRAM-SHA-256 without an initial response, then the IP locked out by other
    connections, then the client-first: it got made-up keys even for a real account, whose
    salt then changed, so each waiting connection told whether a name has an account (enum
    probe). Now it is refused as the AUTH command would be, before any key is looked up."""

    class Scram(FakeServices):
        looked_up: list[str] = []

        def scram_keys(self, login: str) -> sasl.ScramKeys | None:
            self.looked_up.append(login)
            return sasl.derive_scram_keys("pw", b"salt" * 4, 4096)

    services = Scram()
    s = session(services)
    assert asyncio.run(s.step(AuthStart("SCRAM-SHA-256", None))) == sasl.Challenge(b"")
    services.throttle.locked = True
    outcome = asyncio.run(s.step(AuthResponse(b"n,,n=alice@a.test,r=abc")))
    assert outcome == Refused("throttled") and services.looked_up == []


def test_failures_count_for_the_account_however_its_name_is_spelled() -> None:
    """The per-account delay was keyed on the name as typed: "Alice@A.test." or a quoted
    local part started a fresh count for the same account (enum probe)."""
    services = FakeServices()
    for name in ("alice@a.test", "Alice@A.test.", '"alice"@a.test', "no address"):
        asyncio.run(session(services).step(AuthStart("PLAIN", b"\0" + name.encode() + b"\0x")))
    accounts = [account for _ip, account in services.throttle.failures]
    assert accounts == ["alice@a.test"] * 3 + ["no address"]


def test_a_lockout_after_a_right_scram_proof_does_not_refuse_the_last_empty_answer() -> None:
    """The server-final (v=) told the client its login succeeded; a lockout reached by other
    connections just then made the client's empty answer a 454 (recheck probe)."""

    async def login() -> object:
        server_final, s, throttle = await scram_login(locked_meanwhile=False)
        assert isinstance(server_final, sasl.Challenge) and server_final.data.startswith(b"v=")
        throttle.locked = True
        return await s.step(AuthResponse(b""))

    assert asyncio.run(login()) == sasl.Success("alice@a.test")
