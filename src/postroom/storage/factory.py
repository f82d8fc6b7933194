"""Which stores a PostgreSQL node and the CLI use, from ``[storage]``: the one place that knows
the backends apart.

``app.py`` builds the local backend itself (synchronously, as it always has: the embedded
default must not pay for this module) and calls :func:`open_node` for ``backend =
"postgresql"`` (async: the node connects, applies pending schema migrations and loads its
copies of the accounts and DKIM keys before it serves). ``cli.py`` calls :func:`open_admin`
for either backend. Everything else sees the stores through the protocols of
``storage/interfaces.py`` (and ``auth/keys.py`` for the DKIM keys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postroom.auth.keys import KeyStore
from postroom.blocking import BlockingPool
from postroom.config import Config
from postroom.storage.interfaces import (
    AccountLookup,
    AccountStore,
    DestinationSlots,
    MailboxDelivery,
    Maildrops,
    MessageQueue,
)

if TYPE_CHECKING:
    from postroom.storage.postgresql.db import Database, Watcher

log = logging.getLogger("postroom")


@dataclass
class NodeStores:
    """The stores of one worker process on PostgreSQL, and what keeps them running."""

    accounts: AccountLookup
    queue: MessageQueue
    mailboxes: MailboxDelivery
    maildrops: Maildrops
    keys: KeyStore
    slots: DestinationSlots
    database: Database
    watcher: Watcher
    lease_fresh: Callable[[str], bool]  # may a remote delivery of this message finish?

    async def close(self) -> None:
        from postroom.storage.postgresql.keys import PgKeyStore
        from postroom.storage.postgresql.queue import PgQueue

        await self.watcher.close()
        if isinstance(self.queue, PgQueue):
            await self.queue.close()
        if isinstance(self.keys, PgKeyStore):
            self.keys.close()
        await self.database.close()


async def open_node(
    cfg: Config,
    io: BlockingPool,
    index: int = 0,
    wait: bool = False,
    waiting: Callable[[], Callable[[], None]] | None = None,
) -> NodeStores:
    """The stores a PostgreSQL worker serves from (migrated and loaded; errors raise:
    TemporaryStorageError if PostgreSQL cannot be reached, SchemaError for a newer schema).
    With ``wait`` (a worker started again while its node runs) an unreachable PostgreSQL is
    waited for instead: tried again with a back-off of 1 to 10 s, logged once per outage;
    ``waiting`` is called when the wait begins, and what it returns when it ends."""
    from postroom.storage.postgresql.db import TRANSIENT

    delay, waited = 1.0, False
    done: Callable[[], None] | None = None
    try:
        while True:
            try:
                stores = await _open_node(cfg, io, index)
            except TRANSIENT as exc:
                if not wait:
                    raise
                if not waited:
                    log.warning("worker %d: %s; waiting for it before serving", index, exc)
                    waited = True
                    done = waiting() if waiting is not None else None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            if waited:
                log.warning("worker %d: PostgreSQL answers again; serving", index)
            return stores
    finally:
        if done is not None:
            done()


async def _open_node(cfg: Config, io: BlockingPool, index: int) -> NodeStores:
    from postroom.storage.postgresql import db, migrations
    from postroom.storage.postgresql.accounts import LiveAccounts
    from postroom.storage.postgresql.keys import PgKeyStore
    from postroom.storage.postgresql.mailboxes import PgMailboxes, PgMaildrops
    from postroom.storage.postgresql.queue import PgQueue
    from postroom.storage.postgresql.slots import PgSlots

    url = cfg.storage.url
    assert url is not None  # config.py checks it
    db.remember_password(url)  # before privileges are dropped
    conn = await db.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    database = db.Database(url, cfg.storage.pool_size, cfg.storage.max_pop3_sessions)
    await database.open()
    lease = cfg.storage.lease_time
    # Worker ``index``'s drafts of large messages spill here; what a dead one left is removed.
    spill = cfg.data_dir / "tmp" / f"worker{index}"
    queue = PgQueue(url, database, spill, lease, io, cfg.limits.header_size, clean=True)
    queue.log_actions = index == 0
    accounts = LiveAccounts(cfg.domains, url)
    keys = PgKeyStore(url, live=True)
    watcher = db.Watcher(url, [accounts, keys, queue])
    try:
        await watcher.start()
    except BaseException:
        await database.close()
        raise
    queue.start()
    return NodeStores(
        accounts=accounts,
        queue=queue,
        mailboxes=PgMailboxes(database, queue),
        maildrops=PgMaildrops(database),
        keys=keys,
        slots=PgSlots(database, queue.node, lease, queue.held_slots),
        database=database,
        watcher=watcher,
        lease_fresh=queue.lease_fresh,
    )


@dataclass
class AdminStores:
    """The stores a CLI command works on."""

    cfg: Config
    _accounts: AccountStore | None = None
    _queue: MessageQueue | None = None
    _keys: KeyStore | None = None
    _schema_current: bool = False

    @property
    def postgresql(self) -> bool:
        return self.cfg.storage.backend == "postgresql"

    def _pg_url(self) -> str:
        """The url, once the schema is current: any command may be the first to reach a fresh
        database (a queue or dns command before any node started), as ``user add`` may."""
        from postroom.storage.postgresql import maintenance

        url = self.cfg.storage.url
        assert url is not None
        if not self._schema_current:
            maintenance.migrate(url)
            self._schema_current = True
        return url

    @property
    def accounts(self) -> AccountStore:
        if self._accounts is None:
            if self.postgresql:
                from postroom.storage.postgresql.accounts import PgAccounts

                assert self.cfg.storage.url is not None
                self._accounts = PgAccounts(self.cfg.storage.url, self.cfg.domains)
            else:
                from postroom.storage.local.accounts import Accounts

                self._accounts = Accounts(self.cfg.data_dir, self.cfg.domains)
        return self._accounts

    def queue(self, running: bool) -> MessageQueue:
        """The queue. Locally, with no server running, the journal is replayed first (as the
        next start would do), so that the deferred store holds every message."""
        if self._queue is None:
            if self.postgresql:
                from postroom.storage.postgresql.queue import PgQueue

                self._queue = PgQueue(self._pg_url(), None, self.cfg.data_dir / "tmp")
            else:
                from postroom.storage.local import journal
                from postroom.storage.local.queue import LocalQueue

                local = LocalQueue(self.cfg.data_dir, self.cfg.hostname)
                if not running:
                    journal.recover(str(local.journal_dir), journal.boot_id())
                self._queue = local
        return self._queue

    @property
    def keys(self) -> KeyStore:
        if self._keys is None:
            if self.postgresql:
                from postroom.storage.postgresql.keys import PgKeyStore

                self._keys = PgKeyStore(self._pg_url(), live=False)
            else:
                from postroom.auth.keys import LocalKeyStore

                self._keys = LocalKeyStore(self.cfg.data_dir)
        return self._keys

    def create_mailbox(self, key: str) -> None:
        """Make the mailbox of a new user where the backend needs one made."""
        if not self.postgresql:
            from postroom.storage.local import maildir

            maildir.ensure(maildir.mailbox_path(self.cfg.data_dir, key))

    def close(self) -> None:
        if self._accounts is not None:
            self._accounts.close()
        if self.postgresql:
            from postroom.storage.postgresql.keys import PgKeyStore
            from postroom.storage.postgresql.queue import PgQueue

            if isinstance(self._queue, PgQueue):
                self._queue.close_door()
            if isinstance(self._keys, PgKeyStore):
                self._keys.close()
