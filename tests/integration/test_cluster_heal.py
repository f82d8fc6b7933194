"""A node on PostgreSQL heals by itself, and fences what it may no longer finish.

- a worker killed while PostgreSQL is away is started again and waits for the database,
  answering clients with a temporary refusal meanwhile (it left them in the listen backlog),
  and the node takes mail again once PostgreSQL is back, without a restart by hand (it used to
  exit);
- a remote delivery whose lease this worker could not confirm for half a lease (another
  "node" took the row over through SQL while the remote host stalled at DATA) is abandoned
  before its final dot: the remote host never commits it, and nothing is recorded;
- the outcome of a delivery that PostgreSQL could not record (it went away just after the
  remote host's 250) is recorded once it is back, so the message is not sent twice;
- a metrics scrape never waits for a slow database (the queue table locked by another
  session), and ``postroom_storage_up`` says whether the database answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Server, ServerFactory, wait_until
from tests.dnszone import LoopbackDNS
from tests.integration import test_cluster_crash
from tests.integration.test_cluster import retrieve_all, storage_toml
from tests.integration.test_cluster_crash import Sink, worker_pids
from tests.integration.test_observability import get, scrape, value
from tests.pgserver import PgServer, running

A_IP = "127.0.0.2"
LEASE = 2.0
dns = test_cluster_crash.dns  # the fixture: remote.test's MX is the loopback sink


def _send(host: str, port: int, rcpt: str, subject: str, timeout: float = 10) -> bool:
    """True once the message got its 250."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as c:
            c.sendmail("s@x.test", [rcpt], f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())
        return True
    except (OSError, smtplib.SMTPException):
        return False


def test_a_worker_killed_while_postgresql_is_away_comes_back_by_itself(
    server_factory: ServerFactory,
) -> None:
    with running() as pg:
        url = pg.new_database()
        node = server_factory(host=A_IP, extra_toml=storage_toml(url), services=("smtp", "pop3"))
        node.add_user("ann@a.test", "ann-pw")
        smtp = node.ports["smtp"]
        assert _send(node.host, smtp, "ann@a.test", "before")
        pg.stop()
        (worker,) = worker_pids(node)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: worker_pids(node) - {worker}, 15, "the worker to be started again")
        time.sleep(4)  # it finds PostgreSQL away, several times
        assert node.proc is not None and node.proc.poll() is None, node.log.read_text()
        # Meanwhile clients are told to come back later, not left in the listen backlog.
        for service, refusal in (("smtp", b"421 4.3.2 "), ("pop3", b"-ERR [SYS/TEMP] ")):
            with socket.create_connection((node.host, node.ports[service]), timeout=5) as s:
                assert s.recv(200).startswith(refusal)
        pg.start()
        back = time.monotonic()
        wait_until(lambda: _send(node.host, smtp, "ann@a.test", "after", 5), 40, "mail again")
        took = time.monotonic() - back
        log = node.log.read_text()
        assert log.count("waiting for it before serving") == 1, log  # once, not per try
        assert "PostgreSQL answers again" in log
        bodies = retrieve_all(node, "ann@a.test", "ann-pw")
        assert [b.rpartition(b"\r\n\r\n")[2] for b in bodies] == [b"before\r\n", b"after\r\n"]
        print(f"serving again {took:.1f} s after PostgreSQL came back")


@pytest.fixture
def sink() -> Iterator[Sink]:
    made = Sink(["hold", "hold"])  # the remote MX holds every DATA until released
    yield made
    made.close()


def test_a_delivery_whose_lease_was_taken_over_never_sends_its_final_dot(
    server_factory: ServerFactory,
    pg_url: str,
    pg_server: PgServer,
    dns: LoopbackDNS,
    sink: Sink,
) -> None:
    database = pg_url.rpartition("/")[2]
    extra = (
        storage_toml(pg_url) + f'lease_time = "{LEASE}s"\n'
        f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
        f'[delivery]\nport = {sink.port}\nretry_intervals = ["1h"]\n'
    )
    node = server_factory(host=A_IP, extra_toml=extra, services=("smtp",))
    node.cli("alias", "add", "fwd@a.test", "r@remote.test")
    smtp = node.ports["smtp"]

    # A host that stalls at DATA for longer than a lease: the worker renews its lease all the
    # while, so it finishes the message.
    assert _send(node.host, smtp, "fwd@a.test", "slow but mine")
    assert sink.at_data.wait(30)
    time.sleep(LEASE * 1.5)
    sink.release.set()
    wait_until(lambda: len(sink.accepted) == 1, 20, "the first message at the sink")
    wait_until(node.queue_empty, 10, "the first message to leave the queue")

    # The same, but meanwhile another node took the message over (its lease row, through SQL):
    # this worker's renewals no longer confirm it, and it must not finish the transaction.
    sink.at_data.clear()
    sink.release.clear()
    assert _send(node.host, smtp, "fwd@a.test", "taken over")
    assert sink.at_data.wait(30)
    pg_server.psql(
        database,
        "UPDATE queue SET lease_owner = 'other.test/1/cafe', lease_until = postroom_clock() + 600",
    )
    time.sleep(LEASE * 1.5)
    sink.release.set()
    wait_until(lambda: sink.abandoned == 1, 20, "the sink to see the transaction abandoned")
    time.sleep(1)
    assert len(sink.accepted) == 1 and sink.accepted[0].endswith(b"slow but mine\r\n")
    # Nothing recorded: the row is the other node's, as it left it (no attempt added).
    row = pg_server.psql(database, "SELECT lease_owner, envelope::json->'history' FROM queue")
    assert row == "other.test/1/cafe|[]", row
    assert "lease on the message is not confirmed" in node.log.read_text()
    with contextlib.suppress(OSError):
        node.stop()


@contextlib.contextmanager
def _relaying_node(
    factory: ServerFactory, dns: LoopbackDNS, lease: float, retry: str
) -> Iterator[tuple[PgServer, Server, Sink]]:
    """A node on a PostgreSQL of its own that has just accepted a message for a remote MX
    which holds its DATA (until ``held.release`` is set)."""
    held = Sink(["hold"])
    try:
        with running() as pg:
            extra = (
                storage_toml(pg.new_database()) + f'lease_time = "{lease}s"\n'
                f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
                f'[delivery]\nport = {held.port}\nretry_intervals = ["{retry}"]\n'
            )
            node = factory(host=A_IP, extra_toml=extra, services=("smtp",))
            node.cli("alias", "add", "fwd@a.test", "r@remote.test")
            assert _send(node.host, node.ports["smtp"], "fwd@a.test", "held")
            assert held.at_data.wait(30)
            yield pg, node, held
            with contextlib.suppress(OSError):
                node.stop()
    finally:
        held.close()


def test_a_delivery_held_at_data_while_postgresql_is_away_is_abandoned_then_sent_once(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    # The fence with the database gone rather than taken over: the worker cannot renew its
    # lease while the remote host holds DATA, so it must not send the final dot (another node
    # may hold the message by now). Once PostgreSQL is back the message goes out, once.
    with _relaying_node(server_factory, dns, LEASE, "1h") as (pg, node, held):
        pg.stop()
        time.sleep(LEASE * 1.5)
        held.release.set()
        wait_until(lambda: held.abandoned == 1, 20, "the sink to see the transaction abandoned")
        assert held.accepted == []
        wait_until(lambda: "lease on the message is not confirmed" in node.log.read_text())
        pg.start()
        time.sleep(LEASE)  # the lease it held runs out
        wait_until(lambda: node.cli("queue", "flush", check=False).returncode == 0, 20, "a flush")
        wait_until(lambda: len(held.accepted) == 1, 30, "the message at the sink")
        wait_until(node.queue_empty, 20, "the message to leave the queue")
        time.sleep(1)
        assert len(held.accepted) == 1 and held.accepted[0].endswith(b"held\r\n")


def test_an_outcome_postgresql_could_not_take_is_recorded_once_it_is_back(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    # The remote host took the message (250) just after PostgreSQL went away, so the record
    # of that failed. The node keeps the outcome and records it when the database answers
    # again, within its lease: the message is not sent again once the lease has run out (it
    # was, a lease and a retry later, as if the node had died).
    lease = 6.0
    with _relaying_node(server_factory, dns, lease, "1s") as (pg, node, held):
        pg.stop()
        held.release.set()  # within half a lease of the last renewal: the dot goes out
        wait_until(lambda: len(held.accepted) == 1, 20, "the remote host to take it")
        time.sleep(1)  # the record is refused meanwhile
        pg.start()
        wait_until(node.queue_empty, 20, "the outcome to be recorded")
        time.sleep(lease + 2)  # past the lease and the retry: no second copy comes
        assert len(held.accepted) == 1, held.sessions
        assert node.queue_empty()


def test_a_metrics_scrape_never_waits_for_a_slow_database(
    server_factory: ServerFactory, pg_url: str, pg_server: PgServer
) -> None:
    node = server_factory(host=A_IP, extra_toml=storage_toml(pg_url), services=("smtp", "http"))
    database = pg_url.rpartition("/")[2]

    def up() -> float:
        return value(scrape(node), "postroom_storage_up")

    wait_until(lambda: up() == 1, 10, "postroom_storage_up 1")
    # Another session holds the queue table: the count the queue gauges need waits for it.
    locker = subprocess.Popen(
        [
            str(pg_server.bindir / "psql"),
            "-X",
            "-q",
            "-d",
            pg_url,
            "-c",
            "BEGIN; LOCK TABLE queue IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        locked = (
            "SELECT count(*) FROM pg_locks WHERE granted AND mode = 'AccessExclusiveLock'"
            " AND relation = 'queue'::regclass"
        )
        wait_until(lambda: pg_server.psql(database, locked) == "1", 10, "the lock")
        slowest = 0.0
        for _ in range(5):  # the scrapes (and so the worker's event loop) never wait for it
            started = time.monotonic()
            samples = scrape(node)
            slowest = max(slowest, time.monotonic() - started)
            assert ("postroom_queue_messages", ()) in samples
            time.sleep(0.3)
        assert slowest < 1.0, slowest
        started = time.monotonic()
        assert get(node, "/healthz") == (200, b"ok\n")
        assert time.monotonic() - started < 1.0
        # The count times out: the database did not answer in time.
        wait_until(lambda: up() == 0, 15, "postroom_storage_up 0")
    finally:
        pg_server.psql(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
        )
        locker.wait(10)
    wait_until(lambda: up() == 1, 15, "postroom_storage_up 1 again")
    print(f"slowest scrape while the table was locked: {slowest * 1000:.0f} ms")
