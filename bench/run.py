"""Side-by-side benchmark: postroom against Postfix, Dovecot and aiosmtpd, on loopback.

    python bench/run.py             # everything, 3 interleaved runs, writes docs/benchmarks.md
    python bench/run.py --quick     # smaller counts, 1 run, prints only
    python bench/run.py --cases smtp,pop3 --runs 5 --dir /mnt/tmpfs

Each server gets its own 127.0.0.x address and a directory in one fresh temp tree (``--dir``
picks the parent; default the system temp dir), so all data directories share one filesystem.
All servers and threads started here are stopped on exit, on errors and on Ctrl-C/SIGTERM.
See bench/README.md for the cases and what each number means.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from benchlib import cases, report
from benchlib.proc import BenchError, Cleanup
from benchlib.setup import HOSTS, Lab, bring_up

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("smtp", "submission", "pop3", "relay", "mixed", "auth-mx", "auth-submission", "cluster")
ALIASES = {"auth": ("auth-mx", "auth-submission")}
NEEDS = {
    "smtp": {"postroom", "postroom-pg", "postfix", "aiosmtpd"},
    "submission": {"postroom", "postfix", "dovecot"},
    "pop3": {"postroom", "postroom-pg", "dovecot"},
    "relay": {"postroom", "postfix", "dovecot"},
    "mixed": {"postroom"},
    "auth-mx": {"postroom-auth", "postroom-plain", "postfix-auth"},
    "auth-submission": {"postroom-auth", "postroom-plain"},
    "cluster": {"postroom-pg", "postroom-pg2"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases",
        default=",".join(GROUPS),
        help=f"comma-separated groups: {', '.join(GROUPS)}; auth = both auth ones (default: all)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="interleaved runs per case (default 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small message counts and 1 run: a smoke test of the harness",
    )
    parser.add_argument(
        "--servers",
        default="postroom,postroom-pg,postroom-pg2,postfix,dovecot,aiosmtpd",
        help="which servers to start (drop postroom to measure references only; postroom-pg "
        "and postroom-pg2 are two nodes on one private PostgreSQL)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent directory for the bench tree (default: system temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench tree afterwards")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Markdown report (default docs/benchmarks.md; not written by --quick unless given)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the report")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="postroom's `workers` (default: postroom's own default)",
    )
    parser.add_argument(
        "--no-sender-checks",
        action="store_true",
        help="set postroom's `[auth] checks = false` (Postfix here runs no SPF/DKIM/DMARC)",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="set postroom's `pin_cpus = true` (default: postroom's own default)",
    )
    parser.add_argument(
        "--postroom-cmd",
        default=None,
        help="command to run postroom (default: '<python> -m postroom' with src/ on PYTHONPATH)",
    )
    args = parser.parse_args(argv)
    named = [g.strip() for g in args.cases.split(",") if g.strip()]
    args.groups = list(dict.fromkeys(x for g in named for x in ALIASES.get(g, (g,))))
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"--cases: unknown group(s) {', '.join(sorted(unknown))}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if not 1 <= args.runs <= 20:
        parser.error("--runs: between 1 and 20")
    return args


def run_cases(args: argparse.Namespace, lab: Lab, results: report.Results, root: Path) -> None:
    opts = cases.Options(runs=args.runs, quick=args.quick)
    if "smtp" in args.groups:
        rate = cases.disk_rate(root, results)
        print(f"disk: {rate:,.0f} MB/s sequential with fdatasync (dd)", flush=True)
        print("warm-up: 400 messages to each SMTP server, not measured", flush=True)
        cases.warm_up(lab, 80 if args.quick else 400)
        for case in cases.SMTP_CASES:
            cases.smtp_case(lab, results, opts, case)
    if "submission" in args.groups:
        for per_connection, full, quick in ((5, 300, 60), (100, 2000, 400)):
            cases.submission_case(lab, results, opts, per_connection, quick if args.quick else full)
    if "pop3" in args.groups:
        for stls in (False, True):
            for clients in (1, 4):
                cases.pop3_case(lab, results, opts, clients, stls)
    if "relay" in args.groups:
        cases.relay_case(lab, results, opts)
    if "mixed" in args.groups:
        cases.mixed_case(lab, results, opts)
    if "auth-mx" in args.groups or "auth-submission" in args.groups:
        cases.auth_cases(
            lab, results, opts, "auth-mx" in args.groups, "auth-submission" in args.groups
        )
    if "cluster" in args.groups:
        cases.cluster_case(lab, results, opts)


def markdown(args: argparse.Namespace, results: report.Results, root: Path, started: float) -> str:
    rows = report.table(results)
    info = report.machine(root) | report.versions()
    lines = [
        "# Benchmarks: postroom against Postfix, Dovecot and aiosmtpd",
        "",
        "Regenerated by `python bench/run.py` (see `bench/README.md`). Numbers are medians of "
        f"{args.runs} interleaved run(s), with min-max in brackets; the ratio is "
        "postroom's median over the reference's. Load clients run on the same machine.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        f"- command: `python bench/run.py {' '.join(sys.argv[1:])}` "
        f"({time.monotonic() - started:.0f} s)",
        "",
        "## Setup",
        "",
        "- Every server on its own loopback address, its data under one temp tree on the "
        "filesystem above (no tmpfs unless `--dir` says so).",
        "- postroom runs with its default settings"
        + (f" except `workers = {args.workers}`" if args.workers is not None else "")
        + (" and `pin_cpus = true`" if args.pin_cpus else "")
        + (" and `[auth] checks = false`" if args.no_sender_checks else "")
        + ".",
        "- Durability on everywhere: Postfix fsyncs the queue file before 250 and virtual(8) "
        "fsyncs the Maildir file; the aiosmtpd sink fsyncs file and directory before 250; "
        "postroom fdatasyncs its journal (one flush per batch of sessions, for every message; "
        "a large message's own file is flushed beside it and linked into the Maildir; the "
        "Maildir entries are flushed in bulk afterwards), before 250.",
        "- Before the first SMTP case each SMTP server gets 400 messages, unmeasured (warm-up); "
        "between runs mailboxes are emptied by renaming folders away, not by unlinking files.",
        "- SMTP load: Postfix's `smtp-source`; submission and relay: Python smtplib in 4 "
        "processes (STARTTLS + AUTH PLAIN); POP3: a lock-step raw-socket client (one process "
        "per mailbox) doing LIST, RETR+DELE of every message, QUIT.",
        "- Passwords: argon2id for both postroom and Dovecot (Dovecot passwd-file ARGON2ID, "
        "which also serves Postfix's SASL).",
        "- Relay: Postfix A routes relay.test with `transport_maps` to `[127.0.0.15]:2525` "
        "(Postfix cannot use a DNS server on a custom port); postroom A resolves the MX through "
        "the in-process dnslib server.",
        "",
        "## Results",
        "",
        report.render_markdown(rows),
    ]
    if results.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in results.notes]]
    if results.errors:
        lines += ["", "## Failures", ""]
        lines += [f"- {row} / {server}: {msg}" for (row, server), msg in results.errors.items()]
    return "\n".join(lines) + "\n"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)  # also when started with SIGINT ignored
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="postroom-bench-", dir=args.dir))
    root.chmod(0o755)
    print(
        f"bench tree: {root}; addresses: " + ", ".join(f"{k} {v}" for k, v in HOSTS.items()),
        flush=True,
    )
    cleanup = Cleanup()
    results = report.Results()
    try:
        created_at_start = report.creation_cost(root)
        wanted = set().union(*(NEEDS[g] for g in args.groups))
        # --servers names kinds: "postfix" also means the auth group's postfix-auth.
        kinds = {s.strip() for s in args.servers.split(",")}
        wanted = {w for w in wanted if w.split("-")[0] in kinds}
        lab = bring_up(
            root,
            wanted,
            "relay" in args.groups,
            cleanup,
            args.postroom_cmd,
            args.workers,
            args.pin_cpus,
            not args.no_sender_checks,
        )
        results.notes += [n for server in lab.servers.values() for n in server.notes]
        results.notes += [
            f"{name} did not start: {why.splitlines()[-1][:200]}"
            for name, why in lab.failed.items()
        ]
        run_cases(args, lab, results, root)
        results.notes.append(
            "file creation in the bench tree (an empty file, new directory): "
            f"{created_at_start:.0f} µs at the start, {report.creation_cost(root):.0f} µs at "
            "the end; on ext4 without a journal it grows with the files freed in the minutes "
            "before, and every server that makes a file per message pays it"
        )
    except KeyboardInterrupt:
        print("bench: interrupted; stopping servers", flush=True)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", flush=True)
        return 1
    finally:
        cleanup.run_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(report.render_text(report.table(results)))
    output = args.output or (None if args.quick else REPO / "docs" / "benchmarks.md")
    if output is not None and not args.no_write:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown(args, results, root, started))
        print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
