"""Results: samples per (case, metric, server), medians and ratios, text and Markdown tables."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SUBJECT = "postroom"


@dataclass
class Results:
    """Samples keyed by row (case + metric) and server; failures are kept as messages."""

    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def declare(self, row: str, unit: str, servers: list[str]) -> None:
        self.rows.setdefault(row, defaultdict(list))
        self.units[row] = unit
        self.references[row] = [s for s in servers if s != SUBJECT]

    def add(self, row: str, server: str, value: float) -> None:
        self.rows[row][server].append(value)

    def fail(self, row: str, server: str, message: str) -> None:
        self.errors.setdefault((row, server), message)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def cell(samples: list[float]) -> str:
    if not samples:
        return "n/a"
    med = statistics.median(samples)
    if len(samples) == 1:
        return _fmt(med)
    return f"{_fmt(med)} ({_fmt(min(samples))}-{_fmt(max(samples))})"


def ratio(subject: list[float], reference: list[float]) -> str:
    if not subject or not reference:
        return "n/a"
    return f"{statistics.median(subject) / statistics.median(reference):.2f}x"


def table(results: Results) -> list[list[str]]:
    """Rows of: case, unit, postroom, reference 1..2, ratio 1..2 (blank where not applicable)."""
    out = [["case", "unit", SUBJECT, "reference", "median (min-max)", f"{SUBJECT}/ref"]]
    for row, per_server in results.rows.items():
        subject = per_server.get(SUBJECT, [])
        refs = results.references[row] or [""]
        for i, ref in enumerate(refs):
            out.append(
                [
                    row if i == 0 else "",
                    results.units[row] if i == 0 else "",
                    cell(subject) if i == 0 else "",
                    ref,
                    cell(per_server.get(ref, [])) if ref else "",
                    ratio(subject, per_server.get(ref, [])) if ref else "",
                ]
            )
    return out


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _filesystem(path: Path) -> str:
    proc = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False)
    fields = proc.stdout.splitlines()[-1].split() if proc.returncode == 0 else []
    if len(fields) < 7:
        return "?"
    return f"{fields[1]} ({fields[0]}, mounted on {fields[-1]}{_ext4_journal(fields)})"


def _ext4_journal(fields: list[str]) -> str:
    """Whether an ext4 file system has a journal. Without one, ext4 skips the inodes freed in
    the last seconds when it makes a new one (``recently_deleted``): measured on such a file
    system, that scan was a fifth of the Maildir writer's CPU at 1 KiB from 20 sessions,
    and a file's creation took 14 to 60 µs depending on the directory."""
    if fields[1] != "ext4":
        return ""
    task = Path("/sys/fs/ext4", Path(fields[0]).name, "journal_task")
    try:
        return ", no journal" if task.read_text().strip() == "<none>" else ", journaled"
    except OSError:
        return ""


def creation_cost(directory: Path, files: int = 300) -> float:
    """Microseconds per empty file made in a new directory under ``directory``; the files stay
    (they go with the tree: unlinking them would slow the next creations down). On ext4
    without a journal this is what every file-per-message server pays on top of its own
    work, and it moves with what the machine deleted in the minutes before: measured on
    the bench VM, 25 µs in a clean block group and 880 µs in /tmp's after a few bench runs;
    in such a group ext4's ``recently_deleted`` took 65% of postroom's Maildir writer (perf)."""
    probe = Path(tempfile.mkdtemp(prefix="creation-probe-", dir=directory))
    started = time.perf_counter()
    for i in range(files):
        os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return (time.perf_counter() - started) / files * 1e6


def machine(bench_dir: Path) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "filesystem of the bench tree": f"{bench_dir} on {_filesystem(bench_dir.parent)}",
    }


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not installed"
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else "?"

    return {
        "Postfix": first_line(["postconf", "-dh", "mail_version"]),
        "Dovecot": first_line(["dovecot", "--version"]),
        "aiosmtpd": first_line(
            [sys.executable, "-c", "import aiosmtpd; print(aiosmtpd.__version__)"]
        ),
    }
