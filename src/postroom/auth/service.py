"""Sender authentication as the server runs it: the one object the SMTP policy calls.

:meth:`SenderAuth.end_of_data` is called once per message, before the hand-off to the queue:

- from an authenticated user, Authentication-Results fields that name us are removed and,
  when its ``From:`` domain is local, the message is DKIM-signed with every key of that
  domain that DNS already shows (``keys.py``);
- on the ``smtp`` service, from anyone else, SPF, every DKIM signature and DMARC are checked,
  our forged ``Authentication-Results`` are removed and ours is put on top (RFC 8601); a
  DMARC ``fail`` with ``p=reject`` gets ``550 5.7.1`` (unless ``[auth] dmarc_enforce`` is
  false), with ``p=quarantine`` the message gets ``X-Spam-Flag: YES`` for the users' filters.

All DNS goes through one :class:`~postroom.auth.lookup.DnsCache`, and all of a message's
lookups together take at most ``[auth] check_timeout``: what is not answered by then counts
as ``temperror``, which never refuses mail. :func:`count_verdict` is the one place each
result passes (for the metrics). :meth:`SenderAuth.run` is the primary worker's periodic
work: looking for pending DKIM keys in DNS and again at the signing ones (withdrawn when DNS
no longer shows them), retiring old ones, and the daily DMARC reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

from postroom import events
from postroom.address import dmarc_rua_uris
from postroom.auth import (
    dkim_canon,
    dkim_sign,
    dkim_verify,
    dmarc,
    keys,
    records,
    reports,
    results,
    spf,
)
from postroom.auth.helper import (
    MAX_WAIT,
    DkimHelper,
    HelperError,
    HelperNotReady,
    HelperTimedOut,
)
from postroom.auth.lookup import Answer, DnsCache
from postroom.config import Config
from postroom.errors import PostroomError
from postroom.wire import replies
from postroom.wire.framing import to_crlf
from postroom.wire.replies import Reply

log = logging.getLogger("postroom")

DMARC_REJECT = Reply(550, "5.7.1", ("Rejected by the DMARC policy of the From domain",))
QUARANTINE_HEADER = b"X-Spam-Flag: YES\r\n"
TOO_MANY_AUTHORS = Reply(
    550, "5.7.1", (f"More than {dmarc.MAX_FROM_DOMAINS} From domains: not checked, refused",)
)
FROM_UNREADABLE = Reply(
    550,
    "5.7.1",
    (
        f"More than {dmarc.MAX_FROM_FIELDS} From fields, or one over {dmarc.MAX_FROM_LENGTH}"
        " octets: not checked, refused",
    ),
)
# What a server says when a check it must make cannot be made now (RFC 3463 X.3.0).
SIGN_TURN_SIZE = 4 << 20  # octets from which a message waits its turn to be signed
CHECKS_UNAVAILABLE = Reply(451, "4.3.0", ("Sender checks not done in time, try again later",))
RECHECK = 2.0  # seconds between on-demand looks for a pending key in DNS
# Seconds DNS must lack a signing key's record, at every look, before it stops signing: a
# zone change takes minutes to reach every server of the zone.
MISSING_FOR = 300.0
INLINE_JOB = 256 << 10  # without the helper, larger messages are signed/verified in a thread
T = TypeVar("T")


QueueMessage = Callable[[str, list[str], bytes], Awaitable[str]]


def count_verdict(method: str, result: str) -> None:
    """Called once per verdict (``spf``/``dkim``/``dmarc``, an RFC 8601 result name):
    ``postroom_sender_auth_total{method,result}``."""
    events.sender_auth(method, result)


def publishes(record: bytes, key: keys.DkimKey) -> bool:
    """Does the TXT ``record`` let a verifier check ``key``'s signatures (see
    :func:`records.same_key`)?"""
    return records.same_key(record, key.record().encode())


def revokes(record: bytes) -> bool:
    """Is the TXT ``record`` a revoked key: an empty ``p=`` (RFC 6376 §3.6.1)?"""
    return dkim_verify.tags(record).get(b"p") == b""


class Message(Protocol):
    """The message being received, as the SMTP policy holds it (a ``MessageDraft``)."""

    @property
    def size(self) -> int: ...

    def head(self, limit: int) -> bytes: ...

    def whole(self) -> bytes: ...

    def prepend(self, fields: bytes) -> None: ...

    def replace(self, data: bytes) -> None: ...


@dataclass
class Verdict:
    spf: spf.SpfResult | None
    dkim: list[dkim_verify.DkimResult]
    dmarc: dmarc.DmarcResult | None


class SenderAuth:
    """DKIM signing, inbound checks, key upkeep and reports for one server process."""

    def __init__(
        self,
        cfg: Config,
        cache: DnsCache,
        store: keys.KeyStore,
        *,
        run_blocking: Callable[..., Awaitable[object]] | None = None,
        helper: DkimHelper | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.store = store
        self.clock = clock
        self.rng = rng or random.Random()
        self._run_blocking = run_blocking
        self._helper = helper
        self._keys: dict[str, tuple[object, list[keys.DkimKey], list[dkim_sign.SigningKey]]] = {}
        self._had_keys: set[str] = set()  # domains whose keys this process has seen
        self._large_checks = asyncio.Semaphore(1)  # messages past check_max_size, checked
        self._told: set[str] = set()  # selectors whose name DNS gives another key (logged)
        self._last_look: dict[str, float] = {}
        self._looking: dict[str, asyncio.Task[None]] = {}
        # (domain, selector) of signing keys -> the first look that found no record of theirs
        self._missing: dict[tuple[str, str], float] = {}

    @property
    def ring(self) -> keys.KeyRing:
        return keys.KeyRing(self.store, self.cfg.auth.dkim_retire_after)

    # -- keys ----------------------------------------------------------------------------------

    def _named_domains(self) -> list[str]:
        """The local domains that DNS can hold records for: not an address literal
        (``[192.0.2.1]``), which may be local but has no DKIM keys."""
        return [d for d in self.cfg.domains if not d.startswith("[")]

    def ensure_keys(self) -> None:
        """Every local domain has keys (made on first start). A domain whose keys cannot be
        read is logged and left as it is (its submitted mail waits, 451, until they can be):
        the other domains, the MX and POP3 serve on."""
        now = self.clock()
        for domain in self._named_domains():
            try:
                self._gone(domain)
                if self.ring.ensure(domain, now):
                    self._had_keys.add(domain)
            except (OSError, PostroomError) as exc:
                log.error("the DKIM keys of %s cannot be used: %s", domain, exc)

    def _gone(self, domain: str) -> None:
        """KeysUnreadable if the keys this server had for ``domain`` are gone from the store:
        made again, they would take the names of published selectors, in silence."""
        if domain in self._had_keys and not self.store.load(domain):
            raise keys.KeysUnreadable(
                "they are gone from the key store; not made again: restore them, or run"
                f" `postroom dkim rotate {domain}` and publish what `postroom dns` prints"
            )

    def _signers(self, domain: str) -> list[dkim_sign.SigningKey]:
        """The keys that sign for ``domain`` now; none when they cannot be read (logged): for
        our own reports (DSNs, DMARC reports), which are better sent unsigned than not."""
        try:
            return self._domain_keys(domain)[1]
        except (OSError, PostroomError) as exc:
            log.error("the DKIM keys of %s cannot be used (sent unsigned): %s", domain, exc)
            return []

    def _domain_keys(self, domain: str) -> tuple[list[keys.DkimKey], list[dkim_sign.SigningKey]]:
        version = self.store.version(domain)
        cached = self._keys.get(domain)
        if cached is None or cached[0] != version:
            all_keys = self.store.load(domain)
            if all_keys:
                self._had_keys.add(domain)
            else:
                self._gone(domain)
            signers = [
                dkim_sign.SigningKey(domain, k.selector, k.private_key())
                for k in keys.signing_keys(all_keys)
            ]
            cached = (version, all_keys, signers)
            self._keys[domain] = cached
        return cached[1], cached[2]

    async def look_for_pending(self, domain: str) -> None:
        """Confirm each pending key whose exact record DNS now shows, the newest first (an
        older one it retires is not confirmed after it); expire retired ones."""
        now = self.clock()
        self._last_look[domain] = now
        pending = [k for k in self.store.load(domain) if k.state == "pending"]
        newest_first = sorted(pending, key=lambda k: k.created, reverse=True)
        # Asked side by side (one after the other, a slow answer for the first left the
        # second unconfirmed when the signing's wait ran out: a message signed with one key).
        answers = await asyncio.gather(*(self._record_of(domain, k) for k in newest_first))
        for key, answer in zip(newest_first, answers, strict=True):
            if not any(publishes(record, key) for record in answer.txt()):
                if any(_is_key_record(r) for r in answer.txt()) and key.selector not in self._told:
                    # Another key's record under its name (keys made again after theirs were
                    # lost, on the day they were first made): it would wait in silence.
                    self._told.add(key.selector)
                    log.warning(
                        "DKIM key %s of %s waits for its record, but DNS shows another key"
                        " under that name: publish what `postroom dns %s` prints, or run"
                        " `postroom dkim rotate %s`",
                        key.selector,
                        domain,
                        domain,
                        domain,
                    )
                continue
            after = self.ring.confirm(domain, key.selector, self.clock())
            if any(k.selector == key.selector and k.state == "active" for k in after):
                log.info(
                    "DKIM key %s of %s seen in DNS: it signs from now on", key.selector, domain
                )
        self.ring.expire(domain, self.clock())

    async def recheck_active(self, domain: str) -> None:
        """Withdraw each signing key whose record DNS has lacked at every look for
        ``MISSING_FOR`` (an answer without it, not a failed lookup: a server that has not
        loaded the zone's last version yet lacks it too, for a while). It signs again once
        DNS shows it. A key DNS shows revoked (an empty ``p=``, RFC 6376 §3.6.1) retires at
        once. The records a receiver verifies with are those of now, not those seen once."""
        now = self.clock()
        active = [k for k in self.store.load(domain) if k.state == "active"]
        selectors = {k.selector for k in active}
        self._missing = {
            (d, sel): t for (d, sel), t in self._missing.items() if d != domain or sel in selectors
        }
        window = max(MISSING_FOR, self.cfg.auth.dkim_check_interval)
        for key in active:
            answer = await self._record_of(domain, key)
            if answer.temporary:
                continue
            found = answer.txt()
            if any(publishes(record, key) for record in found):
                self._missing.pop((domain, key.selector), None)
                continue
            if any(revokes(record) for record in found):
                log.warning(
                    "DKIM key %s of %s is revoked in DNS: it signs no more;"
                    " run `postroom dkim rotate %s` for new keys",
                    key.selector,
                    domain,
                    domain,
                )
                self.ring.revoke(domain, key.selector, self.clock())
                continue
            why = answer.status if answer.void else "another record"
            first = self._missing.setdefault((domain, key.selector), now)
            if now - first < window:
                log.info(
                    "DKIM key %s of %s not found in DNS (%s): it stops signing if DNS still"
                    " lacks it %.0f s after the first look that did",
                    key.selector,
                    domain,
                    why,
                    window,
                )
                continue
            log.warning(
                "DKIM key %s of %s is no longer in DNS (%s): it signs no more until DNS shows"
                " it again",
                key.selector,
                domain,
                why,
            )
            self.ring.withdraw(domain, key.selector)
            del self._missing[(domain, key.selector)]

    async def _record_of(self, domain: str, key: keys.DkimKey) -> Answer:
        """What DNS answers now (not from the cache) at ``key``'s selector."""
        return await self.cache.query(f"{key.selector}._domainkey.{domain}", "TXT", fresh=True)

    async def _maybe_look(self, domain: str) -> None:
        """While a key waits for DNS, look again at most every RECHECK seconds, shared."""
        if self.clock() - self._last_look.get(domain, 0.0) < RECHECK:
            return
        task = self._looking.get(domain)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self.look_for_pending(domain))
            self._looking[domain] = task
        try:
            await asyncio.wait_for(asyncio.shield(task), min(3.0, self.cfg.dns.timeout))
        except Exception as exc:  # DNS trouble: sign with what is confirmed
            log.info("looking for pending DKIM keys of %s: %r", domain, exc)

    # -- the end of DATA -----------------------------------------------------------------------

    async def end_of_data(
        self,
        message: Message,
        *,
        port: str,
        auth_user: str | None,
        client_ip: str,
        helo: str,
        sender: str,
        received_size: int | None = None,
    ) -> Reply | None:
        """Sign or check ``message`` (changing it in place); a Reply refuses it.
        ``received_size``: its size as the client sent it (CRLF), before a conversion."""
        auth = self.cfg.auth
        size = message.size if received_size is None else received_size
        too_large = size > auth.check_max_size
        if auth_user is not None:
            # RFC 8601 §5: no client writes results in our name, logged in or not.
            self._remove_ours(message)
            if auth.dkim_sign and too_large:
                log.warning(
                    "a message of %s (%d octets) is not DKIM-signed: larger than check_max_size",
                    auth_user,
                    size,
                )
            elif auth.dkim_sign:
                try:
                    # A large one is read and signed when no other large message is being
                    # read here (each holds its size in memory several times over meanwhile:
                    # 30 submissions of 24 MB at once took a worker to 922 MB).
                    async with self._turn(size > SIGN_TURN_SIZE):
                        return await self._sign(message)
                except ChecksUnavailable as exc:
                    log.warning("a message is not accepted now: %s", exc)
                    return CHECKS_UNAVAILABLE
            return None
        if port != "smtp":
            return None
        if not auth.checks:
            self._remove_ours(message)  # RFC 8601 §5: the border's duty, checking or not
            return None
        # A message past check_max_size is verified all the same (left unchecked, any
        # signature claiming the From domain kept DMARC from refusing a forgery), but one
        # such message at a time in this worker (see verify).
        return await self._check(message, client_ip, helo, sender, large=too_large)

    def _client_head(self, message: Message) -> bytes:
        """The client's header section (CRLF): all that SPF, DMARC and finding signatures read."""
        return to_crlf(message.head(self.cfg.limits.header_size + 2))

    def _add_results(self, message: Message, header: bytes, head: bytes | None = None) -> None:
        """Our Authentication-Results on top (RFC 8601 §5), and those in the message that
        name us removed: a forgery, or a copy of ours on mail that came back. A message
        without any costs a copy of its header lines, not of the message."""
        if results.mentions_results(self._client_head(message) if head is None else head):
            message.replace(header + results.strip_ours(message.whole(), self.cfg.hostname))
        else:
            message.prepend(header)

    def _remove_ours(self, message: Message) -> None:
        """The message without the Authentication-Results fields that name us (a copy of the
        message only when it has any such field)."""
        if results.mentions_results(self._client_head(message)):
            whole = message.whole()
            stripped = results.strip_ours(whole, self.cfg.hostname)
            if len(stripped) != len(whole):
                message.replace(stripped)

    async def _sign(self, message: Message) -> Reply | None:
        whole = message.whole()
        head = _head(whole)
        # Each local domain of From signs (several addresses or From fields: a receiver
        # checks each domain's DMARC, RFC 7489 §6.6.1, as ours does); others cannot be.
        local = [d for d in dict.fromkeys(dmarc.from_domains(head)) if d]
        signers: list[dkim_sign.SigningKey] = []
        for domain in filter(self.cfg.is_local_domain, local):
            try:
                all_keys, ready = self._domain_keys(domain)
                # A new key's record may be in DNS now (a withdrawn one waits for run()'s look).
                if any(k.state == "pending" and not k.withdrawn for k in all_keys):
                    await self._maybe_look(domain)
                    _, ready = self._domain_keys(domain)
            except (OSError, PostroomError) as exc:
                # Sent unsigned, it would fail DMARC where the domain asks for p=reject: it
                # waits with its sender (451) until the admin mends the keys.
                log.error("a message is not accepted: the DKIM keys of %s: %s", domain, exc)
                return replies.LOCAL_ERROR
            signers.extend(ready)
        if not signers:
            return None
        if b" :" in head or b"\t:" in head:  # RFC 6409 §8: we may mend what we pass on
            whole = dkim_canon.without_space_before_colons(head) + whole[len(head) :]
            message.replace(whole)
        now = int(self.clock())
        try:
            header = await self._dkim_job(
                len(whole),
                lambda helper: helper.sign(whole, signers, now),
                lambda: dkim_sign.sign(whole, signers, now),
                None,  # a hung helper's signature is made here: unsigned, the mail fails DMARC
            )
        except dkim_canon.MalformedHeader as exc:
            # (The policy ends a header at a line that is no field before this: a header the
            # signer still cannot read goes unsigned, not refused for ever with a 451.)
            log.warning("a message is not DKIM-signed: %s", exc)
            return None
        message.prepend(header)
        return None

    def sign_own(self, message: bytes) -> bytes:
        """The DKIM-Signature fields for a report made on this host (a DSN, ``From:
        MAILER-DAEMON@hostname``), or b"": signed by the local domain that is ``hostname`` or
        holds it (aligned for DMARC, RFC 7489 §3.1.1). A bounce has the null sender, so SPF
        checks only the HELO name: unsigned, it failed DMARC wherever our own domain asks
        for p=reject, and a bounce refused goes nowhere (none is sent for it)."""
        host = self.cfg.hostname.lower()
        holders = [d for d in self._named_domains() if host == d or host.endswith("." + d)]
        if not holders or not self.cfg.auth.dkim_sign:
            return b""
        signers = self._signers(max(holders, key=len))
        return dkim_sign.sign(message, signers, int(self.clock())) if signers else b""

    async def _dkim_job(
        self,
        size: int,
        remote: Callable[[DkimHelper], Awaitable[T]],
        local: Callable[[], T],
        timed_out: Callable[[], T] | None,
    ) -> T:
        """A DKIM job in the helper process; here if it cannot take it (in a thread for a large
        message, so that the event loop gets its turns; inline otherwise: the job holds the
        GIL either way, and the hand-over costs more than a small job). A job the helper did
        not finish in time (a verification of a message made to be slow, or a hung helper)
        is not done again here when ``timed_out()`` stands for its result; without one (our
        own signature, of bounded cost) it is."""
        if self._helper is not None:
            try:
                return await remote(self._helper)
            except HelperNotReady:
                pass
            except HelperTimedOut as exc:
                if timed_out is not None:
                    log.warning("DKIM job given up: %s", exc)
                    return timed_out()
                log.warning("DKIM job done in the server: %s", exc)
            except HelperError as exc:
                log.info("DKIM job done in the server: %s", exc)
        if size > INLINE_JOB and self._run_blocking is not None:
            result = await self._run_blocking(local)
            return cast(T, result)
        return local()

    async def verify(
        self,
        head: bytes,
        whole: Callable[[], bytes],
        client_ip: str,
        helo: str,
        sender: str,
        large: bool = False,
    ) -> Verdict:
        """SPF, DKIM and DMARC of one message (its header section ``head``, CRLF; ``whole``
        reads all of it, which only DKIM needs, and only for a signed message): its DNS
        lookups within ``[auth] check_timeout``, then its signatures in the DKIM helper, in
        their turn behind the jobs before them (see ``helper``); ChecksUnavailable if they
        were not checked in time. A ``large`` message (past ``check_max_size``) is read and
        verified when no other such message is, in this worker (each holds its size in
        memory several times over meanwhile), after its DNS lookups (a lookup that times out
        must not hold the others).

        What the cache already holds is used at once; only what is missing is asked, all of
        it concurrently (the usual case, everything cached, makes no task and never waits)."""
        from_domains = dmarc.from_domains(head)
        chosen, sigs = _chosen_signatures(head, from_domains)
        names = dkim_verify.key_names(sigs)
        hostname = self.cfg.hostname
        spf_result = spf.cached(self.cache, client_ip, sender, helo, hostname)
        key_answers = dkim_verify.cached_keys(self.cache, names)
        policies: dict[str, dmarc.Policy] = {}
        unknown = []  # From domains whose policy is not cached
        for domain in dmarc.author_domains(from_domains):
            policy = dmarc.cached_policy(self.cache, domain)
            if policy is None:
                unknown.append(domain)
            else:
                policies[domain] = policy
        if spf_result is None or key_answers is None or unknown:
            spf_result, key_answers, found = await self._ask(
                spf_result, key_answers, unknown, names, client_ip, helo, sender
            )
            policies.update(found)
        keys = key_answers
        dkim_results: list[dkim_verify.DkimResult] = []  # no signature: dkim=none
        if sigs:
            async with self._turn(large):
                data = whole()
                dkim_results = await self._dkim_job(
                    len(data),
                    lambda helper: helper.verify(data, keys, chosen),
                    lambda: dkim_verify.verify(data, keys, chosen),
                    _checks_unavailable,
                )
        dmarc_result = dmarc.evaluate(from_domains, policies, spf_result, dkim_results, self.rng)
        return Verdict(spf_result, dkim_results, dmarc_result)

    @contextlib.asynccontextmanager
    async def _turn(self, large: bool) -> AsyncIterator[None]:
        """For a ``large`` message, its turn among those of this worker (at most half of the
        helper's MAX_WAIT, so that both waits end within a client's 10 minutes); at once
        for any other. ChecksUnavailable when it does not come."""
        if not large:
            yield
            return
        try:
            await asyncio.wait_for(self._large_checks.acquire(), MAX_WAIT / 2)
        except TimeoutError:
            raise ChecksUnavailable("large messages wait to be checked") from None
        try:
            yield
        finally:
            self._large_checks.release()

    async def _ask(
        self,
        spf_result: spf.SpfResult | None,
        key_answers: dict[str, Answer] | None,
        unknown: list[str],
        names: list[str],
        client_ip: str,
        helo: str,
        sender: str,
    ) -> tuple[spf.SpfResult, dict[str, Answer], dict[str, dmarc.Policy]]:
        """The missing parts of :meth:`verify` (``unknown``: the From domains whose DMARC
        policy is wanted), concurrently, within ``check_timeout``; what has no answer by then
        is a temporary error."""
        jobs: dict[str, asyncio.Future[object]] = {}
        if spf_result is None:
            jobs["spf"] = asyncio.ensure_future(
                spf.check(self.cache, client_ip, sender, helo, self.cfg.hostname)
            )
        if key_answers is None:
            # One job per key: a key whose DNS is dead is a temperror for its own signatures
            # only, not for one whose key came back at once (and may pass DMARC).
            for name in names:
                jobs[f"key {name}"] = asyncio.ensure_future(self.cache.query(name, "TXT"))
        for domain in unknown:
            jobs[f"policy {domain}"] = asyncio.ensure_future(dmarc.discover(self.cache, domain))
        done, pending = await asyncio.wait(jobs.values(), timeout=self.cfg.auth.check_timeout)
        for job in pending:
            job.cancel()

        def outcome(name: str) -> object | None:
            job = jobs.get(name)
            if job is None or job not in done or job.exception() is not None:
                return None
            return job.result()

        if spf_result is None:
            got = outcome("spf")
            spf_result = got if isinstance(got, spf.SpfResult) else _spf_timed_out(sender, helo)
        if key_answers is None:
            key_answers = {}
            for name in names:
                got = outcome(f"key {name}")
                if isinstance(got, Answer):
                    key_answers[name] = got
        policies = {}
        for domain in unknown:
            got = outcome(f"policy {domain}")
            policies[domain] = (
                got
                if isinstance(got, dmarc.Policy)
                else dmarc.Policy(None, temporary="DNS time-out")
            )
        return spf_result, key_answers, policies

    async def _check(
        self, message: Message, client_ip: str, helo: str, sender: str, large: bool = False
    ) -> Reply | None:
        head = self._client_head(message)
        if self.cfg.auth.dmarc_enforce:
            # Past the domains it checks, a forged one rode along unchecked (the 11th), or
            # in a field too long to parse: such a message may be refused (RFC 7489 §6.6.1),
            # and no real sender writes one.
            if dmarc.too_many_authors(dmarc.from_domains(head)):
                log.info("DMARC: a message with too many From domains from %s: refused", client_ip)
                return TOO_MANY_AUTHORS
            if dmarc.from_unreadable(head):
                log.info("DMARC: a message whose From cannot be read from %s: refused", client_ip)
                return FROM_UNREADABLE
        try:
            verdict = await self.verify(head, message.whole, client_ip, helo, sender, large)
        except ChecksUnavailable as exc:
            # Not "temperror" (delivered): a forged From under p=reject came through on it
            # when a queue of costly messages held the helper. The sender tries again later.
            log.warning("a message is not accepted now: %s", exc)
            return CHECKS_UNAVAILABLE
        count_verdict("spf", verdict.spf.result if verdict.spf else "none")
        for r in verdict.dkim or ():
            count_verdict("dkim", r.result)
        if not verdict.dkim:
            count_verdict("dkim", "none")
        result = verdict.dmarc
        assert result is not None
        count_verdict("dmarc", result.result)
        refuse = result.disposition == "reject" and result.result == "fail"
        reject_fail = result.result == "fail" and result.policy == "reject"
        if reject_fail and not self.cfg.auth.dmarc_enforce:
            # Delivered: the disposition applied is none, by local policy (RFC 7489 §7.2's
            # report and the header say so). Also for mail that pct left out of the sample:
            # the quarantine it would get instead derives from the reject.
            result = dataclasses.replace(result, disposition="none", local_override=True)
            refuse = False
        if self.cfg.auth.dmarc_reports and result.record is not None:
            try:
                reports.record(
                    self.cfg.data_dir / "dmarc",
                    client_ip,
                    sender.rpartition("@")[2] if sender else helo,
                    verdict.spf,
                    verdict.dkim,
                    result,
                    self.clock(),
                )
            except OSError as exc:
                log.warning("could not record a DMARC result: %s", exc)
        if result.result == "fail":
            log.info(
                "DMARC fail for %s from %s (%s, disposition %s%s)",
                result.from_domain,
                client_ip,
                results.policy_words(result),
                result.disposition,
                ", reject not enforced" if result.local_override else "",
            )
            if refuse:
                return DMARC_REJECT
        header = results.render(self.cfg.hostname, verdict.spf, verdict.dkim, result)
        if result.result == "fail" and result.disposition == "quarantine":
            header += QUARANTINE_HEADER
        self._add_results(message, header, head)
        return None

    # -- DNS records ---------------------------------------------------------------------------

    def records(self, domain: str) -> list[records.DnsRecord]:
        """What ``postroom dns DOMAIN`` prints (keys made first if need be)."""
        self.ring.ensure(domain, self.clock())
        listed = keys.listed_keys(self.store.load(domain), self.clock())
        uris = dmarc_rua_uris(self.cfg.auth.dmarc_rua or f"postmaster@{domain}")
        return records.wanted(domain, self.cfg.hostname, listed, self.cfg.auth.dmarc_policy, uris)

    # -- periodic work -------------------------------------------------------------------------

    async def send_reports(self, queue: QueueMessage) -> int:
        """Take the recorded rows and queue one signed report per policy domain and rua;
        ``queue(sender, recipients, message)`` queues a message. Returns the count (0 while
        another run, of the server or the CLI, is under way: it sends every row)."""
        folder = self.cfg.data_dir / "dmarc"
        with reports.exclusive(folder) as mine:
            return await self._send_reports(folder, queue) if mine else 0

    async def _send_reports(self, folder: Path, queue: QueueMessage) -> int:
        now = self.clock()
        taken = reports.take(folder, now)
        rows = taken.rows
        if taken.dropped:
            log.warning(
                "DMARC reports: %d rows past the %d a run takes, the oldest, are not reported",
                taken.dropped,
                reports.MAX_ROWS,
            )
        if taken.malformed:
            log.warning(
                "DMARC reports: %d recorded rows not well formed, left out", taken.malformed
            )
        if not rows:
            taken.finish(keep=False)
            return 0
        domain = next(iter(self._named_domains()), self.cfg.hostname)
        sender = f"postmaster@{domain}"
        # Unique per run: §7.2.1.1's Report-ID lets a receiver drop duplicates, and two runs
        # in one second made two different reports with one ID (and one Message-ID).
        prefix = f"{int(now)}.{secrets.token_hex(4)}.{self.cfg.hostname}"
        built = reports.build(rows, self.cfg.hostname, sender, int(now), prefix)
        sent = 0
        keep = False
        for report in built:
            size = len(reports.payload(report))
            where = await reports.destinations(self.cache, report, size)
            for why in where.refused:
                log.warning("DMARC report %s: not sent to %s", report.report_id, why)
            if where.later:  # (then it has no address now)
                keep = True
                log.warning("DMARC report for %s: kept for the next run", report.policy_domain)
                continue
            if not where.addresses:
                taken.mark(report.policy_domain)
                continue
            # A UTF-8 address gets its own copy (its To: in UTF-8, RFC 6532 §3.2, carried with
            # SMTPUTF8): in one message with them, the ASCII ones' hosts without SMTPUTF8
            # refused theirs.
            ascii_to = [a for a in where.addresses if a.isascii()]
            utf8_to = [a for a in where.addresses if not a.isascii()]
            for to in (ascii_to, utf8_to):
                if not to:
                    continue
                from_ = f"dmarc-reports@{domain}"
                message = reports.compose(report, self.cfg.hostname, from_, to, now)
                message = dkim_sign.sign(message, self._signers(domain), int(now)) + message
                queue_id = await queue(sender, to, message)
                log.info(
                    "DMARC report %s for %s queued as %s",
                    report.report_id,
                    report.policy_domain,
                    queue_id,
                )
            taken.mark(report.policy_domain)
            sent += 1
        taken.finish(keep)
        return sent

    async def run(self, queue: QueueMessage) -> None:
        """The primary worker's upkeep: pending, signing and retired keys, daily reports."""
        stamp = self.cfg.data_dir / "dmarc" / "last-report"
        while True:
            for domain in self._named_domains():
                try:
                    await self.recheck_active(domain)
                    await self.look_for_pending(domain)
                except Exception as exc:  # keep looking next time
                    log.warning("DKIM key upkeep for %s failed: %r", domain, exc)
            if self.cfg.auth.dmarc_reports and _due(
                stamp, self.cfg.auth.dmarc_report_interval, self.clock()
            ):
                try:
                    await self.send_reports(queue)
                    _touch(stamp)
                except Exception as exc:
                    log.warning("DMARC reports failed: %r", exc)
            await asyncio.sleep(self.cfg.auth.dkim_check_interval)


class ChecksUnavailable(Exception):
    """A message's signatures were not verified in time (the helper held by a queue of costly
    messages, or hung): the message is refused for now, not accepted unchecked."""


def _checks_unavailable() -> list[dkim_verify.DkimResult]:
    raise ChecksUnavailable("its DKIM signatures were not verified in time")


def _is_key_record(record: bytes) -> bool:
    """Is ``record`` (a TXT string at a selector's name) a DKIM key record with a key?"""
    fields = dkim_verify.tags(record)
    return fields.get(b"v", b"DKIM1") == b"DKIM1" and bool(fields.get(b"p"))


def _chosen_signatures(
    head: bytes, from_domains: list[str]
) -> tuple[list[int], list[dict[bytes, bytes]]]:
    """The signatures of the header section ``head`` that are checked: their positions (for
    :func:`dkim_verify.verify`) and their tags; those aligned with a From domain first
    (:func:`dkim_verify.choose`), since DMARC needs them."""
    found = dkim_verify.signatures(head)
    authors = dmarc.author_domains(from_domains)
    chosen = dkim_verify.choose(found, lambda domain: dmarc.aligned_with(domain, authors))
    return chosen, [found[i] for i in chosen]


def _spf_timed_out(sender: str, helo: str) -> spf.SpfResult:
    """The SPF result of a check that ``check_timeout`` cut short."""
    domain, identity = (sender.rpartition("@")[2], "mailfrom") if sender else (helo, "helo")
    return spf.SpfResult("temperror", domain, identity, problem="DNS time-out")


def _head(message: bytes) -> bytes:
    """The header section (CRLF), without the empty line that ends it."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def _due(stamp: Path, interval: float, now: float) -> bool:
    try:
        last = stamp.stat().st_mtime
    except FileNotFoundError:
        _touch(stamp)  # the first period starts now
        return False
    return now - last >= interval


def _touch(stamp: Path) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp.touch(mode=0o600)
    now = time.time()
    os.utime(stamp, (now, now))
