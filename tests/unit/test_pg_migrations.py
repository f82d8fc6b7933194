"""Schema migrations on a real PostgreSQL: fresh install, upgrade from the first schema,
concurrent migrators, and a database newer than the code."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest

from postroom.storage.postgresql import migrations
from tests.pgserver import PgServer


def _schema(server: PgServer, url: str) -> str:
    """The schema as pg_dump prints it, minus the version rows' timestamps."""
    out = subprocess.run(
        [str(server.bindir / "pg_dump"), "--schema-only", "--no-owner", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    skip = ("--", "\\restrict", "\\unrestrict")  # comments, and the random keys of pg_dump 15.14+
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))


async def _with(url: str, fn):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(url)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def test_fresh_database_gets_every_step(pg_url: str) -> None:
    applied = asyncio.run(_with(pg_url, migrations.migrate))
    assert [m.version for m in applied] == [m.version for m in migrations.MIGRATIONS]
    assert asyncio.run(_with(pg_url, migrations.current_version)) == migrations.LATEST
    assert asyncio.run(_with(pg_url, migrations.migrate)) == []  # nothing left


def test_upgrade_from_the_first_schema_keeps_data_and_ends_equal(
    pg_server: PgServer, pg_url: str
) -> None:
    async def first_then_data(conn: asyncpg.Connection) -> None:
        await migrations.migrate(conn, target=1)
        assert await migrations.current_version(conn) == 1
        await conn.execute(
            "INSERT INTO users (address, password_hash, scram_salt, scram_iterations,"
            " scram_stored_key, scram_server_key) VALUES ('a@x.test', 'h', '', 1, '', '')"
        )
        await conn.execute("INSERT INTO aliases VALUES ('b@x.test', 'a@x.test')")

    asyncio.run(_with(pg_url, first_then_data))
    applied = asyncio.run(_with(pg_url, migrations.migrate))
    assert [m.version for m in applied] == list(range(2, migrations.LATEST + 1))

    async def data(conn: asyncpg.Connection) -> tuple[object, object]:
        return (
            await conn.fetchval("SELECT password_hash FROM users WHERE address='a@x.test'"),
            await conn.fetchval("SELECT target FROM aliases WHERE alias='b@x.test'"),
        )

    assert asyncio.run(_with(pg_url, data)) == ("h", "a@x.test")
    fresh = pg_server.new_database()
    asyncio.run(_with(fresh, migrations.migrate))
    assert _schema(pg_server, pg_url) == _schema(pg_server, fresh)


def test_concurrent_migrators_apply_each_step_once(pg_url: str) -> None:
    async def race() -> list[list[migrations.Migration]]:
        conns = [await asyncpg.connect(pg_url) for _ in range(4)]
        try:
            return list(await asyncio.gather(*(migrations.migrate(c) for c in conns)))
        finally:
            for c in conns:
                await c.close()

    results = asyncio.run(race())
    versions = sorted(m.version for r in results for m in r)
    assert versions == [m.version for m in migrations.MIGRATIONS]

    async def rows(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM schema_version"))

    assert asyncio.run(_with(pg_url, rows)) == migrations.LATEST


def test_a_failed_step_leaves_nothing_behind(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = (
        *migrations.MIGRATIONS,
        migrations.Migration(99, "broken", "CREATE TABLE t1 (a int); SELECT 1/0"),
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", broken)
    monkeypatch.setattr(migrations, "LATEST", 99)
    with pytest.raises(asyncpg.DivisionByZeroError):
        asyncio.run(_with(pg_url, migrations.migrate))

    async def state(conn: asyncpg.Connection) -> tuple[int, object]:
        return (
            await migrations.current_version(conn),
            await conn.fetchval("SELECT to_regclass('t1')"),
        )

    assert asyncio.run(_with(pg_url, state)) == (migrations.MIGRATIONS[-2].version, None)


def test_a_newer_database_is_refused(pg_url: str) -> None:
    async def newer(conn: asyncpg.Connection) -> None:
        await migrations.migrate(conn)
        await conn.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, 'from the future')",
            migrations.LATEST + 1,
        )

    asyncio.run(_with(pg_url, newer))
    with pytest.raises(migrations.SchemaError, match="upgrade postroom"):
        asyncio.run(_with(pg_url, migrations.migrate))
