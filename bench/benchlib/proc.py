"""Process bookkeeping for the benchmark: start, wait for ports, and always clean up.

Every server the harness starts is registered in a :class:`Cleanup` stack; ``run.py`` unwinds the
stack in a ``finally`` block and on SIGTERM/SIGINT, so no Postfix master, Dovecot or postroom is
left behind. Only processes started here are ever signalled, by their own pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class BenchError(RuntimeError):
    """A setup step or a measurement failed; the message says which."""


class Cleanup:
    """A LIFO stack of undo actions; each runs once, errors are reported and swallowed."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, label: str, action: Callable[[], None]) -> None:
        self._actions.append((label, action))

    def run_all(self) -> None:
        while self._actions:
            label, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # cleanup must go on whatever happened
                print(f"bench: cleanup {label}: {exc}", flush=True)


def run(
    cmd: Sequence[str],
    *,
    stdin: str | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capture its output; BenchError with stderr when it fails."""
    proc = subprocess.run(
        list(cmd),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc


def start_daemon(
    cmd: Sequence[str],
    log: Path,
    cleanup: Cleanup,
    label: str,
    env: dict[str, str] | None = None,
    grace: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start a foreground server with output to ``log``; registered for termination (SIGKILL
    ``grace`` seconds after SIGTERM)."""
    log_file = log.open("ab")
    proc = subprocess.Popen(
        list(cmd),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log_file.close()
    cleanup.push(label, lambda: stop_process(proc, grace))
    return proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll until ``host:port`` accepts a connection; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    if proc is not None and proc.poll() is not None:
        raise BenchError(
            f"exited with status {proc.returncode} before {host}:{port} opened\n{tail}"
        )
    raise BenchError(f"{host}:{port} did not open within {timeout:.0f}s\n{tail}")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
