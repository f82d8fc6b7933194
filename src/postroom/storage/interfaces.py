"""The storage interfaces: what the servers and the queue runner need from a backend.

The :class:`typing.Protocol`\\ s, named for what they hold:

* :class:`MessageQueue`: accepted messages until every recipient is done (the durable hand-off
  from SMTP, the runner's due work, attempts and per-recipient state, the CLI's view);
* :class:`MailboxDelivery`: the writing side of the mailboxes (a copy of a queued message
  into a local recipient's mailbox, at most once);
* :class:`AccountLookup`: what the servers ask of the accounts (from memory), and
  :class:`AccountStore`: those lookups plus the changes the CLI makes;
* :class:`DestinationSlots`: how many deliveries to one domain may run at once;
* :class:`Maildrops`: the reading side of the mailboxes, for POP3 (below).

The local backend (``storage/local/``: a journal plus Maildirs, SQLite) implements them for
one machine; the PostgreSQL one (``storage/postgresql/``) implements the same methods over a
database that several nodes share. The docstrings say what each call promises, for the
implementer of a backend: the runner, the SMTP policy and the CLI rely on nothing else.

Conventions: times are seconds since the epoch (float); message octets are stored with LF line
ends (the SMTP layer refuses bare CR and LF, so CRLF <-> LF is lossless) and start with the
``Return-Path:`` line; ``queue_id`` is letters and digits (``queue.envelope.check_id``).

The POP3 side: a :class:`Maildrops` opens a user's :class:`Maildrop`, a locked snapshot of a
mailbox for one session (RFC 1939 §8: one session per maildrop; RFC 2449 §8.1.1 ``[IN-USE]``
when another holds it). Message numbers are positions in the snapshot, 1-based. Text comes out
with CRLF line ends whatever the backend stores (RFC 1939 §3), and the sizes in the snapshot are
exactly the octets RETR sends before dot-stuffing (RFC 1939 §5, §11). Deletions are applied only
by :meth:`Maildrop.update` (the UPDATE state, RFC 1939 §6); a session that ends otherwise changes
nothing. Today's backend is the Maildir one in ``storage/local/maildrop.py``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from postroom.address import Address
from postroom.queue.envelope import Attempt, Envelope
from postroom.sasl import ScramKeys


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """One copy to put in a mailbox: the recipient's index in the envelope and its mailbox
    (an account key ``local@domain``). The pair names the copy: delivering it twice must
    find the first one and not make a second."""

    index: int
    mailbox: str


class MessageDraft(Protocol):
    """A message being received (DATA/BDAT), made by :meth:`MessageQueue.draft`.

    Takes the octets as they come off the wire (CRLF line ends, dot-unstuffed) and stores them
    with LF line ends, without holding a large message whole in memory. Nothing is durable
    until :meth:`MessageQueue.accept` returns."""

    @property
    def size(self) -> int:
        """Octets of the message as stored (LF line ends, our trace headers included)."""
        ...

    @property
    def wire_size(self) -> int:
        """Octets of the message with CRLF line ends, as SMTP carries it (trace headers too)."""
        ...

    def write(self, data: bytes) -> None:
        """Append a piece of the client's message (CRLF). A storage failure is remembered and
        raised by :meth:`MessageQueue.accept` (the client gets its 452 after the data)."""
        ...

    def head(self, limit: int) -> bytes:
        """The first ``limit`` octets of the client's message (LF; no trace headers), or only
        its header section (up to and including the empty line) when that ends before: what
        header checks need, without reading a large message's body."""
        ...

    async def rewrite(
        self, convert: Callable[[bytes], bytes], needed: Callable[[bytes], bool] | None = None
    ) -> None:
        """Replace the client's message (CRLF, no trace headers) by ``convert(message)``:
        submitted mail made 7-bit with short lines before it is signed. ``needed``, a cheap
        test of the message in its stored form (LF), says False when ``convert`` would change
        nothing. Before any :meth:`prepend`: our trace headers are made again from the new
        message."""
        ...

    def whole(self) -> bytes:
        """The message so far as SMTP carries it (CRLF line ends), our trace headers first,
        without the ``Return-Path`` line: what DKIM signs and checks. In memory: meant for
        messages up to ``[auth] check_max_size``."""
        ...

    def prepend(self, fields: bytes) -> None:
        """Put header fields (CRLF) above everything else, trace headers included: a DKIM
        signature, our authentication results. Costs a copy of the header lines, not of the
        message (a large one already in its body file is moved up once, by the queue's
        accept, off the event loop)."""
        ...

    def replace(self, data: bytes) -> None:
        """Put ``data`` (CRLF; a changed :meth:`whole`, e.g. without forged authentication
        results) in place of the message."""
        ...

    def abort(self) -> None:
        """Drop the draft (RSET, a refused message, a lost connection)."""
        ...


class MessageQueue(Protocol):
    """Accepted messages and their delivery state.

    Locally one process (the primary worker) owns the retries and every worker owns the first
    attempt of the messages it accepted; a shared backend lets any node claim any due message
    under a lease. Every method that changes state is durable when it returns."""

    # -- intake ---------------------------------------------------------------------------------

    def draft(
        self, queue_id: str, sender: str, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> MessageDraft:
        """A new message under ``queue_id`` (:func:`queue.envelope.new_queue_id`) from
        ``sender`` ("" for ``<>``), whose ``Return-Path`` line it starts with. Once the
        client's header section has been seen (or a large part of it), ``make_prefix(head)``
        gives our trace headers (LF), stored above the client's message."""
        ...

    async def accept(
        self,
        envelope: Envelope,
        draft: MessageDraft,
        deliver_now: Sequence[LocalCopy],
        hold: bool = False,
    ) -> list[OSError | None]:
        """Make the message durable with its envelope (the client's 250 waits for this and
        nothing else), and put the copies ``deliver_now`` in their mailboxes, in the same
        commit where the backend can (one shared flush: concurrent calls are committed
        together). Returns, for each copy of ``deliver_now``, None or why it failed (the
        runner then retries it). ``envelope`` already records the first attempt of the other
        recipients (``attempts`` 1, ``next_attempt`` the retry after it): it is made at once,
        and a crash before it is recorded must not retry it in a loop. The caller makes that
        first attempt: the message is claimed by it from the start (a shared backend inserts
        it under this node's lease, so that no other node claims it meanwhile).

        Raises :class:`~postroom.errors.TemporaryStorageError` if nothing could be stored
        (disk full, database away: the client gets 452); nothing is kept or delivered then.
        A message whose every recipient is done in this call is not kept at all, unless
        ``hold`` (the runner owes a success DSN for it: it calls :meth:`finish` then)."""
        ...

    # -- the runner -----------------------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[Envelope]:
        """Up to ``limit`` messages due at ``now`` (``next_attempt <= now``) not claimed by
        anyone else, oldest due first. A shared backend takes a lease on each (owner node,
        expiry) and commits it before returning; another node may take a message whose lease
        expired. Locally a no-op lease: the primary worker owns the queue."""
        ...

    async def begin_attempt(self, envelope: Envelope) -> None:
        """Store ``envelope``'s new ``attempts``, ``last_attempt`` and ``next_attempt`` (the
        caller has set them) before any remote host is dialled, so that a crash during the
        attempt delays the message instead of retrying it at once. Renews the lease; raises
        :class:`~postroom.errors.LeaseLost` if this node no longer holds the message (deleted,
        or taken over by another node after its lease ran out): the caller then drops it."""
        ...

    async def save(self, envelope: Envelope) -> None:
        """Store ``envelope``'s state as it is now, during an attempt: the DSNs it decided to
        send (``reports``) with the outcomes they report, before any of them is queued. The
        message stays this worker's (no lease ends, nothing is scheduled); raises
        :class:`~postroom.errors.LeaseLost` as :meth:`begin_attempt` does."""
        ...

    async def peek(self, queue_id: str) -> Envelope | None:
        """The stored state of a message, without claiming it; None if it is not queued."""
        ...

    async def body(self, envelope: Envelope) -> bytes:
        """The stored message (LF, starting with the ``Return-Path`` line).
        :class:`~postroom.errors.LeaseLost` if it was deleted meanwhile."""
        ...

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        """Store the outcome of an attempt: per-recipient ``status``/``last_error``/
        ``remote_mta`` as ``envelope`` holds them now, and ``attempts`` appended to its
        history. The message stays queued (some recipient is not done, or a DSN in its
        ``reports`` is not queued yet); the lease ends."""
        ...

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        """Every recipient is done (delivered or bounced, its DSNs queued): forget the
        message. A crash after the remote 250 and before this call may send a remote copy
        again (RFC 5321 §6.1 allows it); nothing else may repeat."""
        ...

    # -- the CLI and the control socket ---------------------------------------------------------

    def entries(self) -> list[Envelope]:
        """Every queued message, oldest first, with its state and history. Works without a
        running server. Unreadable entries are reported by :meth:`problems`."""
        ...

    def load(self, queue_id: str) -> Envelope:
        """One message; :class:`~postroom.errors.QueueError` if unknown or unreadable."""
        ...

    def head(self, envelope: Envelope, limit: int = 65536) -> bytes:
        """The first ``limit`` octets of the stored message (for ``queue show``)."""
        ...

    async def delete(self, queue_id: str) -> None:
        """Remove the message without a bounce (QueueError if unknown). An attempt running
        elsewhere finishes, but records nothing for it afterwards."""
        ...

    def flush(self, busy: AbstractSet[str] = frozenset()) -> int:
        """Make every deferred message due now; how many. ``busy``: the messages whose
        attempts run now, due again as soon as those end (if a recipient is left)."""
        ...

    def add_waiting(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Queue a message made by the CLI (CRLF: a DMARC report), due at once; its queue id.
        Blocking and durable."""
        ...

    def problems(self) -> list[str]:
        """Corrupt entries found and set aside (quarantined) since the last call."""
        ...

    async def wait(self, timeout: float) -> None:
        """Return when the queue may have new due work (a CLI ``flush``, a message handed
        over by another worker or node) or after ``timeout``. Locally the control socket
        wakes it; PostgreSQL: LISTEN/NOTIFY."""
        ...


class MailboxDelivery(Protocol):
    """The writing side of the mailboxes: what local delivery needs."""

    async def deliver(
        self, envelope: Envelope, copies: Sequence[LocalCopy]
    ) -> list[OSError | None]:
        """Put a copy of the queued message ``envelope`` into each mailbox of ``copies``,
        durably, once: a copy that is there already (delivered before a crash, maybe read
        since) is not made again. For each: None or the error that kept it out."""
        ...


class AccountLookup(Protocol):
    """What the servers ask of the accounts, per RCPT and per login. Synchronous and cheap:
    answered from memory (a shared backend keeps a copy fresh, e.g. by LISTEN/NOTIFY) and
    seeing a change made by the CLI within a second. :meth:`verify_password` is called in a
    worker thread (argon2 is slow on purpose)."""

    def user_exists(self, key: str) -> bool: ...

    def credential(self, key: str) -> str | None:
        """What a login as ``key`` proved, as stored now (its password's hash), or None
        without the account: a session whose login no longer matches it sends no more."""
        ...

    def has_mailbox(self, key: str) -> bool:
        """May mail be stored for local ``key``: a user, or ``postmaster@``."""
        ...

    def verify_password(self, login: str, password: str) -> str | None:
        """The account key when ``password`` is right for ``login``; None otherwise."""
        ...

    def scram_keys(self, login: str) -> tuple[str, ScramKeys] | None:
        """The account key and its SCRAM-SHA-256 keys (RFC 5802), or None."""
        ...

    @property
    def decoy_secret(self) -> bytes:
        """A random secret made once with the store and kept in it: SCRAM's made-up salt
        for a login without an account comes from it, so that the salt stays the same on
        every node and after a restart, as a real one does (see ``sasl.py``)."""
        ...

    def alias_targets(self, key: str) -> Sequence[str]: ...

    def expand(self, key: str, max_depth: int = ...) -> list[str] | None:
        """The final addresses of ``key`` through aliases (itself for a user); None if it is
        neither a user nor an alias; [] for an alias loop or aliases nested too deep."""
        ...

    def resolve(self, key: str) -> list[str] | None:
        """Where mail for local ``key`` goes: :meth:`expand`, else ``postmaster@`` itself,
        else the domain's catch-all; None for no such address."""
        ...

    @property
    def local_domains(self) -> frozenset[str]:
        """The local domains (a SIGHUP may set new ones)."""
        ...

    @local_domains.setter
    def local_domains(self, domains: Iterable[str]) -> None: ...

    def owns(self, user_key: str, sender_key: str) -> bool:
        """May ``user_key`` send as ``sender_key``: its own address or an alias reaching it."""
        ...

    def close(self) -> None: ...


class AccountStore(AccountLookup, Protocol):
    """The lookups and the changes the CLI makes: users, passwords and aliases. The rules
    (targets must exist, catch-alls, ``user del`` cleaning aliases) are those of
    ``storage/aliases.py``; each change is one transaction."""

    def add_user(self, address: Address, password: str) -> None: ...

    def set_password(self, address: Address, password: str) -> None: ...

    def delete_user(self, address: Address) -> list[tuple[str, str]]:
        """Remove the user, and it from every alias that names it (and in turn every alias
        left with no target); the ``(target, alias)`` pairs taken out."""
        ...

    def list_users(self) -> list[str]: ...

    def add_alias(self, alias: str, targets: Iterable[str]) -> None:
        """``alias`` is an address key, or ``@domain`` for the domain's catch-all."""
        ...

    def delete_alias(self, alias: str) -> list[tuple[str, str]]:
        """Remove the alias and, unless it is a user too, take it out of every alias as
        :meth:`delete_user` does; the pairs taken out."""
        ...

    def list_aliases(self) -> dict[str, list[str]]: ...


class DestinationSlots(Protocol):
    """Limits the deliveries under way to one destination domain (``max_per_destination``):
    per process locally, across every node on a shared backend."""

    def slot(self, destination: str, limit: int) -> AbstractAsyncContextManager[None]:
        """Wait for one of ``limit`` slots of ``destination``; held for the ``async with``."""
        ...

    def relimit(self, limit: int) -> None:
        """A reload changed ``max_per_destination``: ``limit`` holds now, for the deliveries
        already waiting too."""
        ...


# -- POP3: the reading side of the mailboxes -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a snapshot: the octets RETR sends (CRLF, unstuffed) and its UIDL
    (RFC 1939 §7: 1 to 70 characters 0x21-0x7E, never reused for another message)."""

    size: int
    uid: str


class Maildrop(Protocol):
    """One session's view of one mailbox; made by :meth:`Maildrops.maildrop`."""

    async def open(self) -> Sequence[MessageInfo]:
        """Lock the mailbox and take the snapshot, oldest message first.

        Raises :class:`postroom.errors.MailboxInUse` if another session holds the lock, and
        OSError (or the backend's error) if the mailbox cannot be read now."""
        ...

    def read_now(self, number: int) -> bytes | None:
        """The whole message if the backend has it at hand without waiting long (a small local
        file), else None: then :meth:`chunks` it. FileNotFoundError if it is gone."""
        ...

    def chunks(self, number: int) -> AsyncGenerator[bytes, None]:
        """The message in pieces of bounded size, with CRLF line ends (a last line without one
        is ended by the dot-stuffing). FileNotFoundError if it is gone; closing the iterator
        early stops the reading (TOP)."""
        ...

    async def update(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        """Apply the UPDATE state: remove ``deleted``, mark ``seen`` (retrieved and kept) as
        read. Returns how many removals failed; a message already gone counts as removed."""
        ...

    async def close(self) -> None:
        """Release the lock (and whatever the session held). Safe to call more than once."""
        ...


class Maildrops(Protocol):
    """Opens maildrops: what the POP3 server gets from :class:`postroom.services.Services`."""

    def maildrop(self, key: str) -> Maildrop:
        """The maildrop of account ``key`` (``local@domain``, vetted by ``address.py``)."""
        ...
