"""Scale checks of issue 7: many idle connections, and intake with a big deferred queue.

    python bench/scale.py [--connections 10000] [--deferred 100000] [--messages 5000] [--rounds 3]

1. Opens ``--connections`` idle SMTP connections to postroom (loopback, bounded in time), and
   reports the server's RSS before and after, and the latency of a normal transaction then.
2. Measures the accept rate (smtp-source, 20 sessions, 1 KiB) with an empty queue and with
   ``--deferred`` deferred messages in the spool (written directly in the spool's format, not
   due for a day), ``--rounds`` times in turns, each time on a server started afresh; reports
   the rates and the start-up time the recovery took.

Not run by CI. Needs /usr/sbin/smtp-source (apt package postfix).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.30"
ROOT = Path(__file__).resolve().parents[1]
SMTP_SOURCE = "/usr/sbin/smtp-source"


_ports = iter(range(21000, 22000))


def free_port() -> int:
    """A port free on HOST now, never the same twice. Not one the kernel picks (port 0): that
    comes from the ephemeral range, where a client socket opened meanwhile may take it first."""
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {HOST}")


def rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its descendants (the server and its Maildir writer)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(rss_kib(int(c)) for c in child.read_text().split())
    return total


class Postroom:
    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = base / "postroom.toml"
        self.config.write_text(
            f'hostname = "mx.scale.test"\ndomains = ["scale.test"]\n'
            f'data_dir = "{base / "data"}"\nlog_level = "warning"\n'
            f'[listen]\nsmtp = ["{HOST}:{self.port}"]\n'
            f"[limits]\nmax_connections = 30000\n"
            # What is measured is the queue and the connections: the sender checks would wait
            # for DNS answers this machine cannot get (every message its check_timeout).
            "[auth]\nchecks = false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.cli("user", "add", "u@scale.test", "--password-stdin", "--allow-short", stdin="pw\n")

    def cli(self, *args: str, stdin: str | None = None) -> None:
        subprocess.run(
            [sys.executable, "-m", "postroom", *args, "-c", str(self.config)],
            input=stdin.encode() if stdin else None,
            check=True,
            capture_output=True,
        )

    def start(self) -> float:
        log = self.base / "server.log"
        seen = log.stat().st_size if log.exists() else 0  # an earlier start's lines
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "serve", "-c", str(self.config)],
            stderr=open(self.base / "server.log", "ab"),  # noqa: SIM115
        )
        # The port accepts as soon as it is bound; "ready" comes after the queue is recovered.
        deadline = t0 + 600
        while time.monotonic() < deadline:
            if b"postroom: ready" in log.read_bytes()[seen:]:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError("postroom did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def transaction_latency(port: int) -> float:
    t0 = time.monotonic()
    with smtplib.SMTP(HOST, port, timeout=60) as c:
        c.sendmail("a@x.test", ["u@scale.test"], b"Subject: t\r\n\r\nt\r\n")
    return time.monotonic() - t0


def idle_connections(srv: Postroom, count: int) -> dict[str, float]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert srv.proc is not None
    before = rss_kib(srv.proc.pid)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 120
    try:
        while len(socks) < count and time.monotonic() < deadline:
            s = socket.create_connection((HOST, srv.port), timeout=10)
            socks.append(s)
        for s in socks:  # every one got its banner: the server really holds them
            if not s.recv(100).startswith(b"220"):
                raise RuntimeError("no banner")
        time.sleep(1)
        after = rss_kib(srv.proc.pid)
        latency = transaction_latency(srv.port)
    finally:
        for s in socks:
            s.close()
    return {
        "connections": len(socks),
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "kib_per_connection": (after - before) / max(1, len(socks)),
        "transaction_latency_ms": latency * 1000,
    }


def fill_queue(data_dir: Path, count: int) -> None:
    """Write ``count`` deferred messages in the deferred store's own format (no fsync:
    set-up only): the message, and its envelope with state."""
    sys.path.insert(0, str(ROOT / "src"))
    from postroom.queue.envelope import Envelope, Recipient, new_queue_id

    msg_dir, state_dir = data_dir / "queue" / "msg", data_dir / "queue" / "state"
    for d in (msg_dir, state_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    body = b"Return-Path: <a@x.test>\nSubject: deferred\n\n" + b"x" * 1000 + b"\n"
    for _ in range(count):
        env = Envelope(
            id=new_queue_id(),
            sender="a@x.test",
            recipients=[Recipient("r@far.test", status="deferred", last_error="451 4.4.1 down")],
            created=now,
            size=len(body),
            attempts=1,
            next_attempt=now + 86400,
        )
        state = state_dir / f"{env.id}.json"
        state.write_bytes(env.to_json())
        os.utime(state, (env.next_attempt, env.next_attempt))  # its mtime: when it is due
        (msg_dir / env.id).write_bytes(body)
    # A real queue was fsync'ed file by file as it was written: flushed once here, so that
    # the flush of 100 MB of set-up does not land in the middle of the measurement.
    os.sync()


def accept_rate(port: int, messages: int) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            "20",
            "-m",
            str(messages),
            "-l",
            "1024",
            "-f",
            "a@x.test",
            "-t",
            "u@scale.test",
            f"{HOST}:{port}",
        ],
        check=True,
        timeout=600,
    )
    return messages / (time.monotonic() - t0)


def rate_after_warmup(port: int, messages: int, runs: int = 2) -> int:
    """Median accept rate of ``runs`` runs after an unmeasured warm-up run (the first run
    after start-up is the slowest for any server)."""
    accept_rate(port, max(100, messages // 5))
    return round(statistics.median(accept_rate(port, messages) for _ in range(runs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--deferred", type=int, default=100_000)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, object] = {}
    base = Path(tempfile.mkdtemp(prefix="postroom-scale-"))
    try:
        srv = Postroom(base / "idle")
        srv.start()
        try:
            results["idle"] = idle_connections(srv, args.connections)
        finally:
            srv.stop()
        # Empty and loaded queue in turns, each on a server started afresh: on 2 cores one
        # server instance can run ~1.7x faster than the next (where the scheduler puts its
        # processes), so one instance each would measure that rather than the queue.
        empty = Postroom(base / "a")
        loaded = Postroom(base / "b")
        fill_queue(base / "b" / "data", args.deferred)
        runs: list[list[int]] = [[], []]
        for _ in range(args.rounds):
            for i, srv in enumerate((empty, loaded)):
                started = srv.start()
                try:
                    runs[i].append(rate_after_warmup(srv.port, args.messages))
                finally:
                    srv.stop()
                if srv is loaded:
                    results.setdefault("startup_with_deferred_s", started)
        results["runs_empty_queue"], results["runs_with_deferred"] = runs
        medians = [statistics.median(r) for r in runs]
        results["rate_empty_queue"], results["rate_with_deferred"] = medians
        results["deferred"] = args.deferred
        ratio = float(results["rate_with_deferred"]) / float(results["rate_empty_queue"])  # type: ignore[arg-type]
        results["ratio_deferred_vs_empty"] = ratio
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    sys.exit(main())
