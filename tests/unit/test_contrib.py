"""contrib/: the Prometheus alerts and the Grafana dashboard load, and every query in them names
a metric postroom exports (a renamed metric would silently blind an alert)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from postroom.metrics import Metrics, StateCollector, parse
from tests.conftest import ROOT, need_tool

ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "postroom-dashboard.json"
_NAME = re.compile(r"\b(postroom_[a-zA-Z0-9_]+|up)\b")
BUILTIN = {"up"}


def exported(tmp_path: Path) -> set[str]:
    """Every sample name postroom's /metrics can show, with each label set used once."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.prime(["smtp", "submission", "submissions", "pop3", "pop3s"])
    for family in (
        metrics.refusals,
        metrics.tls_handshakes,
        metrics.throttled,
        metrics.sender_auth,
        metrics.attempt_seconds,
        metrics.bounces,
        metrics.dns_lookups,
        metrics.disk_full,
        metrics.bytes_received,
        metrics.bytes_sent,
    ):
        family.labels(*["x"] * len(family._labelnames))
    registry.register(
        StateCollector(tmp_path, lambda: (0, None), lambda: 0.0, lambda: 0.0, lambda: True)
    )
    names = {name for name, _labels in parse(generate_latest(registry).decode())}
    return names | BUILTIN


def test_counters_alerts_watch_exist_at_zero_from_the_start() -> None:
    """increase() over a series that first shows up at 1 is 0: the first refusal for a full
    disk, or the first bounce, would not fire its alert."""
    registry = CollectorRegistry()
    Metrics(registry).prime(["smtp", "submission", "submissions", "pop3", "pop3s"])
    samples = parse(generate_latest(registry).decode())
    watched = re.findall(r"increase\((postroom_[a-z_]+)", ALERTS.read_text())
    assert watched
    for name in watched:
        assert any(n == name for n, _ in samples), name
    zero = [v for (n, _), v in samples.items() if n == "postroom_disk_full_refusals_total"]
    assert len(zero) == 3 and set(zero) == {0.0}  # one per SMTP service


def queries_name_known_metrics(exprs: list[str], known: set[str]) -> None:
    assert exprs
    for expr in exprs:
        names = set(_NAME.findall(expr))
        assert names, f"no postroom metric in {expr!r}"
        assert names <= known, f"{expr!r} names unknown metrics {names - known}"


def test_alert_rules(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    # What the issue asks an admin be told about.
    assert {
        "PostroomQueueStuck",
        "PostroomDeferralsRising",
        "PostroomAuthFailureStorm",
        "PostroomDiskNearlyFull",
        "PostroomCertificateExpiring",
    } <= alerts
    queries_name_known_metrics(exprs, exported(tmp_path))


def test_alert_rules_promtool() -> None:
    promtool = need_tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queries_name_known_metrics(exprs, exported(tmp_path))


UNIT = ROOT / "contrib" / "systemd" / "postroom.service"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[:1].isalpha()
    )
    assert settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "User" not in settings  # root to bind, then postroom drops to its config's user
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "CAP_NET_BIND_SERVICE" in settings["CapabilityBoundingSet"]
    # verify wants the ExecStart program to exist: point it at this Python.
    import sys

    unit = tmp_path / "postroom.service"
    unit.write_text(text.replace("/usr/local/bin/postroom", f"{sys.executable} -m postroom"))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # It exits 0 on unknown keys and bad values too, but names the file in a warning.
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(unit) in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
