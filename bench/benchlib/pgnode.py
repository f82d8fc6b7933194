"""postroom on PostgreSQL under test: a private PostgreSQL, one or two nodes, the mailbox rows.

The PostgreSQL is the tests' private server (``tests/pgserver.py``: initdb in a temp
directory, as the ``postgres`` user when run as root, a loopback port) with ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on: every 250 waits for a WAL flush, as
Postfix's waits for its fsync. Node 1 (``postroom-pg``, 127.0.0.21) and node 2
(``postroom-pg2``, 127.0.0.22) share its one database; each has its own data_dir. Mailboxes
are rows of ``messages``: :class:`PgStore` counts, empties and pre-fills them through one
connection of its own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchlib import maildir, postroom
from benchlib.proc import Cleanup
from benchlib.servers import Server

REPO = Path(__file__).resolve().parents[2]
HOSTS = {"postroom-pg": "127.0.0.21", "postroom-pg2": "127.0.0.22"}


def start_postgresql(cleanup: Cleanup) -> str:
    """A private, durable PostgreSQL and a database for postroom; its url."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.pgserver import PgServer, need_postgresql

    server = PgServer(need_postgresql(), fsync=True)
    cleanup.push("postgresql", server.destroy)
    server.start()
    return server.new_database()


@dataclass
class PgStore:
    """The ``messages`` rows of one database, as :class:`~benchlib.servers.MailStore`."""

    url: str

    def __post_init__(self) -> None:
        from postroom.storage.postgresql import db

        self.door = db.Door(self.url, "bench")

    def close(self) -> None:
        self.door.close()

    def count(self, user: str) -> int:
        found = self.door.call(
            lambda c: c.fetchval("SELECT count(*) FROM messages WHERE mailbox=$1", user)
        )
        return int(found)

    def count_messages(self, user: str) -> int:
        return self.count(user)

    def clear(self, user: str) -> None:
        self.door.call(lambda c: c.execute("DELETE FROM messages WHERE mailbox=$1", user))
        self.door.call(lambda c: c.execute("VACUUM messages"))

    def fill(self, user: str, messages: int, size: int) -> None:
        """The same message as the Maildir servers get, stored as postroom stores it (CRLF),
        then a CHECKPOINT (the Maildir servers get an ``os.sync``)."""
        self.clear(user)
        body = maildir.make_message(0, size, "sender@src.test", user).replace(b"\n", b"\r\n")
        self.door.call(
            lambda c: c.execute(
                "INSERT INTO messages (mailbox, uidl, size, body)"
                " SELECT $1, 'bench' || g, $2, $3 FROM generate_series(1, $4) AS g",
                user,
                len(body),
                body,
                messages,
            )
        )
        self.door.call(lambda c: c.execute("VACUUM ANALYZE messages"))
        self.door.call(lambda c: c.execute("CHECKPOINT"))


def start_nodes(
    base: postroom.PostroomSpec,
    root: Path,
    mail_users: list[str],
    cleanup: Cleanup,
    cmd_override: str | None,
    count: int = 2,
) -> dict[str, Server]:
    """``count`` nodes on one new PostgreSQL, named as in :data:`HOSTS`."""
    url = start_postgresql(cleanup)
    store = PgStore(url)
    cleanup.push("bench's PostgreSQL connection", store.close)
    toml = f'[storage]\nbackend = "postgresql"\nurl = "{url}"\n'
    nodes = {}
    for i, (name, host) in enumerate(list(HOSTS.items())[:count]):
        spec = replace(base, root=root / name, host=host, extra_toml=toml)
        # The users are shared: added once, through the first node's CLI.
        server = postroom.start_postroom(spec, mail_users if i == 0 else [], cleanup, cmd_override)
        server.name = name
        server.store = store
        nodes[name] = server
    return nodes
