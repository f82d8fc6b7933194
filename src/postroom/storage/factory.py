"""Which stores a node and the CLI use, from ``[storage]``: the one place that knows backends.

``app.py`` calls :func:`open_node` (async: a PostgreSQL node connects, applies pending schema
migrations, and loads its copy of the accounts before it serves); ``cli.py`` calls
:func:`open_admin` (synchronous). Neither imports a backend module itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from postroom.address import Address
from postroom.config import Config
from postroom.sasl import ScramKeys


class AccountLookup(Protocol):
    """What the servers ask of the account store, per RCPT and per login (synchronous)."""

    def user_exists(self, key: str) -> bool: ...

    def expand(self, key: str) -> list[str] | None: ...

    def owns(self, user_key: str, sender_key: str) -> bool: ...

    def verify_password(self, login: str, password: str) -> str | None: ...

    def scram_keys(self, login: str) -> tuple[str, ScramKeys] | None: ...


class AccountAdmin(Protocol):
    """What the CLI does with the account store."""

    def add_user(self, address: Address, password: str) -> None: ...

    def set_password(self, address: Address, password: str) -> None: ...

    def delete_user(self, address: Address) -> Sequence[str] | None:
        """The aliases the user was taken out of (None: not told)."""
        ...

    def list_users(self) -> list[str]: ...

    def user_exists(self, key: str) -> bool: ...

    def add_alias(self, alias: Address, targets: Iterable[str]) -> None: ...

    def delete_alias(self, alias: Address) -> None: ...

    def list_aliases(self) -> dict[str, list[str]]: ...

    def alias_targets(self, key: str) -> Sequence[str]: ...

    def close(self) -> None: ...


@dataclass
class NodeStores:
    """The stores of one running worker."""

    accounts: AccountLookup
    database: object | None = None  # postgresql.db.Database when the backend is postgresql

    async def close(self) -> None:
        from postroom.storage.local.accounts import Accounts

        if isinstance(self.accounts, Accounts):
            self.accounts.close()
            return
        from postroom.storage.postgresql.accounts import LiveAccounts
        from postroom.storage.postgresql.db import Database

        if isinstance(self.accounts, LiveAccounts):
            await self.accounts.close()
        if isinstance(self.database, Database):
            await self.database.close()


async def open_node(cfg: Config) -> NodeStores:
    """The stores a worker serves from (PostgreSQL: migrated and loaded; errors raise)."""
    if cfg.storage.backend == "local":
        from postroom.storage.local.accounts import Accounts

        return NodeStores(Accounts(cfg.data_dir))
    from postroom.storage.postgresql import db, migrations
    from postroom.storage.postgresql.accounts import LiveAccounts

    url = cfg.storage.url
    assert url is not None  # config.py checks it
    conn = await db.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    database = db.Database(url, cfg.storage.pool_size, cfg.storage.max_pop3_sessions)
    await database.open()
    accounts = LiveAccounts(url, cfg.domains)
    try:
        await accounts.start()
    except BaseException:
        await database.close()
        raise
    return NodeStores(accounts, database)


@dataclass
class AdminStores:
    """The stores a CLI command works on."""

    accounts: AccountAdmin
    cfg: Config

    def create_mailbox(self, key: str) -> None:
        """Make the mailbox of a new user where the backend needs one made."""
        if self.cfg.storage.backend == "local":
            from postroom.storage.local import maildir

            maildir.ensure(maildir.mailbox_path(self.cfg.data_dir, key))

    def close(self) -> None:
        self.accounts.close()


def open_admin(cfg: Config) -> AdminStores:
    if cfg.storage.backend == "local":
        from postroom.storage.local.accounts import Accounts

        return AdminStores(Accounts(cfg.data_dir), cfg)
    from postroom.storage.postgresql.accounts import AccountAdmin as PgAccountAdmin

    assert cfg.storage.url is not None
    return AdminStores(PgAccountAdmin(cfg.storage.url, cfg.domains), cfg)
