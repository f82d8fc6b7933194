"""The PostgreSQL schema and its migrations: versioned, transactional, applied by new versions.

Each :class:`Migration` is one step from version N-1 to N, applied in one transaction together
with its row in ``schema_version``: a step is in whole or not at all. Steps are only ever added,
never edited once released, so a database made by any earlier version is brought up to date by
the steps it lacks. Nodes that start at once serialise on a transaction-level advisory lock;
the second finds the work done.

``postroom serve`` applies pending steps before it serves; ``postroom db migrate`` does it by
hand and ``postroom db check`` tells the version, the pending steps and whether the server
answers. A database newer than this postroom (a node not yet upgraded) is refused: its code
could misread what the newer version writes. Steps are additive (new tables, columns with
defaults), so nodes already running the previous version keep working during a rolling upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from postroom.errors import PostroomError

# pg_advisory_xact_lock key of the migrator ("postroom" in ASCII, as a bigint).
MIGRATION_LOCK = 0x706F7374726F6F6D


class SchemaError(PostroomError):
    """The database's schema is one this version cannot use (newer, or broken)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "accounts and aliases",
        """
        CREATE TABLE users (
            address text PRIMARY KEY,              -- Address.key: lower-cased, IDNA domain
            password_hash text NOT NULL,           -- argon2id, PHC string
            scram_salt bytea NOT NULL,             -- SCRAM-SHA-256 (RFC 7677)
            scram_iterations integer NOT NULL,
            scram_stored_key bytea NOT NULL,
            scram_server_key bytea NOT NULL,
            created timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE aliases (
            alias text NOT NULL,                   -- a key, or "@domain" for a catch-all
            target text NOT NULL,
            PRIMARY KEY (alias, target)
        );
        CREATE INDEX aliases_target ON aliases (target);

        -- Every node keeps a copy of these tables in memory (lookups per RCPT and per login
        -- cost no round trip); a change tells them which key to read again.
        CREATE FUNCTION postroom_account_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_TABLE_NAME = 'users' THEN
                IF TG_OP <> 'INSERT' THEN
                    PERFORM pg_notify('postroom_accounts', 'u' || OLD.address);
                END IF;
                IF TG_OP <> 'DELETE' THEN
                    PERFORM pg_notify('postroom_accounts', 'u' || NEW.address);
                END IF;
            ELSE
                IF TG_OP <> 'INSERT' THEN
                    PERFORM pg_notify('postroom_accounts', 'a' || OLD.alias);
                END IF;
                IF TG_OP <> 'DELETE' THEN
                    PERFORM pg_notify('postroom_accounts', 'a' || NEW.alias);
                END IF;
            END IF;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
            FOR EACH ROW EXECUTE FUNCTION postroom_account_changed();
        CREATE TRIGGER aliases_changed AFTER INSERT OR UPDATE OR DELETE ON aliases
            FOR EACH ROW EXECUTE FUNCTION postroom_account_changed();
        """,
    ),
    Migration(
        2,
        "mailboxes",
        """
        CREATE TABLE messages (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- the order POP3 lists
            mailbox text NOT NULL,                 -- the owner's Address.key
            uidl text NOT NULL,                    -- RFC 1939 §7: unique in the mailbox, kept
            size bigint NOT NULL,                  -- octets of body (CRLF, as RETR sends it)
            flags text NOT NULL DEFAULT '',        -- Maildir letters; "S" once retrieved
            received timestamptz NOT NULL DEFAULT now(),
            body bytea NOT NULL,                   -- the message with CRLF line ends
            UNIQUE (mailbox, uidl)                 -- delivery is idempotent by (mailbox, uidl)
        );
        -- Uncompressed out of line: RETR reads a large body in slices without decompressing
        -- it from the start for each one; mail compresses poorly once it is base64 anyway.
        ALTER TABLE messages ALTER COLUMN body SET STORAGE EXTERNAL;
        CREATE INDEX messages_mailbox ON messages (mailbox, id) INCLUDE (uidl, size, flags);
        """,
    ),
    Migration(
        3,
        "DKIM keys",
        """
        CREATE TABLE dkim_keys (
            domain text NOT NULL,
            selector text NOT NULL,
            algorithm text NOT NULL,               -- "ed25519" or "rsa"
            created double precision NOT NULL,     -- seconds since the epoch, as DkimKey has
            state text NOT NULL,                   -- "pending", "active" or "retiring"
            published double precision,            -- first seen in DNS
            retire_at double precision,            -- retiring: listed until then
            private_pem bytea NOT NULL,            -- PKCS #8, PEM
            PRIMARY KEY (domain, selector)
        );
        CREATE FUNCTION postroom_dkim_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('postroom_dkim', COALESCE(NEW.domain, OLD.domain));
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER dkim_keys_changed AFTER INSERT OR UPDATE OR DELETE ON dkim_keys
            FOR EACH ROW EXECUTE FUNCTION postroom_dkim_changed();
        """,
    ),
    Migration(
        4,
        "queue",
        """
        -- Leases are timed by the database's clock, so that nodes whose clocks differ agree.
        CREATE FUNCTION postroom_clock() RETURNS double precision LANGUAGE sql VOLATILE AS
            $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;
        CREATE TABLE queue (
            id text PRIMARY KEY,                   -- the queue id: unique across nodes
            created double precision NOT NULL,     -- seconds since the epoch
            next_attempt double precision NOT NULL,  -- due then (0: now)
            lease_owner text,                      -- the node attempting it now, if any
            lease_until double precision,          -- ... until then (postroom_clock())
            envelope text NOT NULL,                -- Envelope.to_json(): state and history
            body bytea NOT NULL                    -- LF line ends, from the Return-Path line
        );
        ALTER TABLE queue ALTER COLUMN body SET STORAGE EXTERNAL;
        CREATE INDEX queue_due ON queue (next_attempt);
        CREATE INDEX queue_leases ON queue (lease_owner) WHERE lease_owner IS NOT NULL;
        -- The local copies a later attempt made (recipient index): made once, even if the
        -- user has fetched and deleted the copy before the attempt was recorded.
        CREATE TABLE queue_copies (
            queue_id text NOT NULL REFERENCES queue (id) ON DELETE CASCADE,
            idx integer NOT NULL,
            PRIMARY KEY (queue_id, idx)
        );
        -- Deliveries under way per destination domain, across nodes (max_per_destination).
        CREATE TABLE delivery_slots (
            destination text NOT NULL,
            slot integer NOT NULL,
            owner text NOT NULL,
            until double precision NOT NULL,       -- postroom_clock(); renewed like a lease
            PRIMARY KEY (destination, slot)
        );
        """,
    ),
    Migration(
        5,
        "secrets",
        """
        -- Random secrets of the store, made once. "scram-decoy": what SCRAM's made-up salt for
        -- a login without an account is derived from, the same on every node (sasl.py).
        -- Two version-4 UUIDs hold 244 random bits (gen_random_uuid: pg_strong_random).
        CREATE TABLE secrets (
            name text PRIMARY KEY,
            value bytea NOT NULL
        );
        INSERT INTO secrets (name, value) VALUES ('scram-decoy', decode(
            replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
        """,
    ),
)

LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied timestamptz NOT NULL DEFAULT now()
)
"""


async def current_version(conn: asyncpg.Connection) -> int:
    """The version the database is at; 0 for an empty one."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM schema_version")
    return int(version or 0)


async def pending(conn: asyncpg.Connection) -> list[Migration]:
    """The steps not yet applied; SchemaError if the database is newer than this version."""
    version = await current_version(conn)
    if version > LATEST:
        raise SchemaError(
            f"the database schema is at version {version}; this postroom knows up to"
            f" {LATEST}: upgrade postroom on this node"
        )
    return [m for m in MIGRATIONS if m.version > version]


async def migrate(conn: asyncpg.Connection, target: int | None = None) -> list[Migration]:
    """Apply the pending steps up to ``target``, each in its own transaction; those applied."""
    done: list[Migration] = []
    for step in await pending(conn):
        if target is not None and step.version > target:
            break
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_VERSION_TABLE)
            if await current_version(conn) >= step.version:
                continue  # another node applied it meanwhile
            await conn.execute(step.sql)
            await conn.execute(
                "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                step.version,
                step.name,
            )
        done.append(step)
    return done
