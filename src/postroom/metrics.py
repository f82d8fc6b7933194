"""The Prometheus metrics of a running server, and how a scrape reads them (prometheus-client).

:class:`Metrics` declares every metric once: name, help, labels. With one worker the values are
plain in-process numbers; with ``workers`` > 1 each worker writes its own into a memory-mapped
file under ``data_dir/metrics`` (prometheus-client's multiprocess mode) and a scrape, answered
by whichever worker the kernel hands the connection to, adds up the files of all of them, so one
scrape shows the whole server. The directory is emptied at every start.

Values that are cheaper to read than to keep up to date are collected at scrape time by
:class:`StateCollector`: messages in the queue (those waiting for a retry, from the queue's
directory, plus those in their first attempt, which each worker counts) and the age of the
oldest, the free space under ``data_dir``. The certificate's expiry is set when it is
loaded. What is counted where is decided in ``events.py``; this module only declares and reads.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

METRICS_DIR = "metrics"

SMTP_SERVICES = ("smtp", "submission", "submissions")
POP3_SERVICES = ("pop3", "pop3s")
TRANSPORTS = ("local", "remote")
DELIVERY_RESULTS = ("delivered", "deferred", "bounced")
SENDER_AUTH_RESULTS = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"),
    "dkim": ("pass", "fail", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
}
# Seconds: a local delivery takes milliseconds, a remote one up to minutes of time-outs.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


# How the values of several workers add up (prometheus-client's multiprocess modes).
Mode = Literal["livesum", "mostrecent", "min"]


class Metrics:
    """Every metric postroom exports (the names and labels are part of its interface)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        def gauge(name: str, doc: str, labels: Iterable[str] = (), mode: Mode = "livesum") -> Gauge:
            return Gauge(name, doc, list(labels), registry=registry, multiprocess_mode=mode)

        self.smtp_connections = counter(
            "postroom_smtp_connections", "SMTP connections accepted", ["service"]
        )
        self.smtp_messages = counter(
            "postroom_smtp_messages",
            "Messages accepted (250 after DATA) or rejected (a refused MAIL, RCPT or DATA)",
            ["service", "result"],
        )
        self.refusals = counter(
            "postroom_smtp_refusals",
            "SMTP refusals by reason (user_unknown, relay_denied, sender_not_owned, ...)",
            ["service", "reason"],
        )
        self.deliveries = counter(
            "postroom_deliveries",
            "Delivery attempts per recipient and their outcome",
            ["transport", "result"],
        )
        self.attempt_seconds = Histogram(
            "postroom_delivery_attempt_duration_seconds",
            "How long a delivery attempt took, per recipient",
            ["transport", "result"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.bounces = counter(
            "postroom_bounces", "Delivery status notifications queued", ["action"]
        )
        self.auth_failures = counter(
            "postroom_auth_failures", "Failed logins (SMTP AUTH, POP3)", ["service"]
        )
        self.pop3_sessions = counter("postroom_pop3_sessions", "POP3 connections", ["service"])
        self.sender_auth = counter(
            "postroom_sender_auth",
            "SPF, DKIM and DMARC verdicts on inbound mail (RFC 8601 result names)",
            ["method", "result"],
        )
        self.sessions_open = gauge(
            "postroom_sessions_open", "Client connections open now", ["service"]
        )
        self.first_attempts = gauge(
            "postroom_queue_first_attempts",
            "Messages in their first delivery attempt (in the queue, not yet waiting for a retry)",
        )
        self.bytes_received = counter(
            "postroom_received_bytes", "Octets received from clients", ["service"]
        )
        self.bytes_sent = counter("postroom_sent_bytes", "Octets sent to clients", ["service"])
        self.tls_handshakes = counter(
            "postroom_tls_handshakes",
            "TLS handshakes by protocol version and outcome (ok, failed)",
            ["service", "version", "outcome"],
        )
        self.dns_lookups = counter(
            "postroom_dns_lookups",
            "DNS queries for delivery (ok, nodata, nxdomain, timeout, error)",
            ["result"],
        )
        self.throttled = counter(
            "postroom_throttled",
            "Clients turned away for their behaviour (login_lockout, connection_limit)",
            ["service", "reason"],
        )
        self.disk_full = counter(
            "postroom_disk_full_refusals",
            "Messages refused with 452 4.3.1 because the disk was full",
            ["service"],
        )
        self.cert_expiry = gauge(
            "postroom_tls_certificate_expiry_timestamp_seconds",
            "When the server certificate expires (Unix time)",
            mode="mostrecent",
        )
        self.start_time = gauge(
            "postroom_start_time_seconds", "When the server started (Unix time)", mode="min"
        )

    def prime(self, services: Iterable[str]) -> None:
        """Make the series an alert compares over time exist from the start, at 0."""
        services = list(services)
        for service in services:
            if service in SMTP_SERVICES:
                self.smtp_connections.labels(service)
                for result in ("accepted", "rejected"):
                    self.smtp_messages.labels(service, result)
                self.disk_full.labels(service)  # increase() misses a series born at 1
            if service in POP3_SERVICES:
                self.pop3_sessions.labels(service)
            if service != "http":
                self.auth_failures.labels(service)
                self.sessions_open.labels(service)
        for transport in TRANSPORTS:
            for result in DELIVERY_RESULTS:
                self.deliveries.labels(transport, result)
        if any(service in SMTP_SERVICES for service in services):
            # The common verdicts (RFC 8601 §2.7): with several workers, a family without a
            # series is left out of the scrape, and an absent() alert took it for gone.
            for method, results in SENDER_AUTH_RESULTS.items():
                for result in results:
                    self.sender_auth.labels(method, result)


def always_up() -> bool:
    """``postroom_storage_up`` of the local backend: files, no database to lose."""
    return True


class StateCollector(Collector):
    """Collected at each scrape: the queue (from the spool directory, or as the database
    last counted it), whether the database answers, and the disk."""

    def __init__(
        self,
        data_dir: Path,
        spool: Callable[[], tuple[int, float | None]],
        first_attempts: Callable[[], float],
        clock: Callable[[], float],
        storage_up: Callable[[], bool],
    ) -> None:
        self.data_dir = data_dir
        self.spool = spool
        self.first_attempts = first_attempts
        self.clock = clock
        self.storage_up = storage_up

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "postroom_storage_up",
            "1 when this worker's last round trip to the database succeeded (always 1 locally)",
            1 if self.storage_up() else 0,
        )
        count, oldest = self.spool()
        yield GaugeMetricFamily(
            "postroom_queue_messages",
            "Messages in the queue (waiting for a retry or being delivered)",
            count + self.first_attempts(),
        )
        age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        yield GaugeMetricFamily(
            "postroom_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when it is empty)",
            age,
        )
        try:
            usage = shutil.disk_usage(self.data_dir)
        except OSError:
            return
        yield GaugeMetricFamily(
            "postroom_data_dir_free_bytes", "Free space on the file system of data_dir", usage.free
        )
        yield GaugeMetricFamily(
            "postroom_data_dir_size_bytes", "Size of the file system of data_dir", usage.total
        )


class Exporter:
    """What a scrape of ``/metrics`` returns, for this process's way of keeping values."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def render(self) -> bytes:
        return generate_latest(self.registry)


def prepare_directory(data_dir: Path) -> Path:
    """Start-up, before the workers are made: an empty ``data_dir/metrics`` (values of an earlier
    run would be added to this one's)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / METRICS_DIR
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


def forget_worker(data_dir: Path, pid: int) -> None:
    """A worker has ended (the supervisor reaped it): what it had open (its sessions, its first
    attempts) no longer counts; what it counted stays counted."""
    path = data_dir / METRICS_DIR
    if path.is_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def build(
    multiprocess_dir: Path | None,
    data_dir: Path,
    spool: Callable[[], tuple[int, float | None]],
    storage_up: Callable[[], bool],
) -> tuple[Metrics, Exporter]:
    """The metrics of this process and the exporter a scrape uses.

    ``multiprocess_dir`` (several workers) switches prometheus-client to memory-mapped values
    there; it must be done before any metric is made, and only in the worker processes.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double what a scrape must read
    registry = CollectorRegistry(auto_describe=True)
    first_attempts: Callable[[], float]
    if multiprocess_dir is None:
        metrics = Metrics(registry)
        first_attempts = functools.partial(_value, metrics.first_attempts)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiprocess_dir)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        metrics = Metrics(None)
        MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
        first_attempts = functools.partial(
            _livesum, multiprocess_dir, "postroom_queue_first_attempts"
        )
    registry.register(StateCollector(data_dir, spool, first_attempts, time.time, storage_up))
    return metrics, Exporter(registry)


def _value(gauge: Gauge) -> float:
    """A gauge's value in this process."""
    return sum(s.value for family in gauge.collect() for s in family.samples)


def _livesum(directory: Path, name: str) -> float:
    """A ``livesum`` gauge's value over every worker (from their files)."""
    paths = glob.glob(os.path.join(directory, "gauge_livesum_*.db"))
    for family in MultiProcessCollector.merge(paths, accumulate=False):  # type: ignore[no-untyped-call]
        if family.name == name:
            return float(sum(s.value for s in family.samples))
    return 0.0


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of an exposition, keyed by (name, sorted labels): for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out
