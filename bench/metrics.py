"""Issue 17: what the metrics and the logs cost. SMTP accept rate with metrics scraped every
second against metrics off (no ``[listen] http``), and with the info-level log lines against
``log_level = "warning"``, on servers started afresh, in turns.

    python bench/metrics.py [--messages 4000] [--rounds 5] [--workers 1] [--variants off,on,quiet]

Variants: ``off`` (no metrics, info logs: the default config), ``on`` (metrics, scraped),
``quiet`` (no metrics, warnings only). Each round starts one server per variant (the order
rotates between rounds), sends an unmeasured warm-up, then measures smtp-source (20 sessions,
1 KiB, one message per connection) twice and keeps the median (sender checks off: there is no
DNS here); with metrics on, a thread GETs /metrics once a second throughout and the last
scrape must count every message. Prints the medians, the ranges, on/off, quiet/off and the log
lines written per message as JSON. Not run by CI. Needs /usr/sbin/smtp-source (apt package
postfix).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from scale import HOST, Postroom, accept_rate, free_port

ACCEPTED = 'postroom_smtp_messages_total{result="accepted",service="smtp"}'


class Scraper(threading.Thread):
    """GET /metrics once a second until stopped; remembers the last accepted count."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{HOST}:{port}/metrics"
        self.halt = threading.Event()
        self.scrapes = 0
        self.accepted = 0.0

    def scrape(self) -> None:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(ACCEPTED):
                    self.accepted = float(line.rsplit(" ", 1)[1])
        self.scrapes += 1

    def run(self) -> None:
        while not self.halt.wait(1.0):
            self.scrape()


def server(base: Path, variant: str, workers: int) -> tuple[Postroom, int | None]:
    # (scale.Postroom's config has the sender checks off: without a DNS server to ask they
    # would wait for time-outs, and what is measured here is the cost of metrics and logs.)
    srv = Postroom(base)
    http = free_port() if variant == "on" else None
    level = 'log_level = "warning"\n' if variant == "quiet" else ""
    text = srv.config.read_text().replace('log_level = "warning"\n', f"workers = {workers}\n")
    if http is not None:
        text = text.replace("[limits]", f'http = ["{HOST}:{http}"]\n[limits]')
    srv.config.write_text(level + text)
    return srv, http


def log_lines(srv: Postroom) -> int:
    with open(srv.base / "server.log", "rb") as f:
        return sum(1 for _ in f)


def measure(base: Path, variant: str, messages: int, workers: int) -> tuple[float, float]:
    """The accept rate, and the log lines written per message meanwhile."""
    srv, http = server(base, variant, workers)
    srv.start()
    scraper = None
    try:
        accept_rate(srv.port, max(200, messages // 5))  # warm-up, unmeasured
        if http is not None:
            scraper = Scraper(http)
            scraper.scrape()
            before = scraper.accepted
            scraper.start()
        time.sleep(1.5)  # the warm-up's lines are out (written at least once a second)
        lines = log_lines(srv)
        rates = [accept_rate(srv.port, messages) for _ in range(2)]
        if scraper is not None:
            scraper.halt.set()
            scraper.join()
            scraper.scrape()
            if scraper.accepted - before != 2 * messages:
                raise RuntimeError(f"metrics counted {scraper.accepted - before} messages")
        time.sleep(1.5)
        per_message = (log_lines(srv) - lines) / (2 * messages)
        return statistics.median(rates), per_message
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--variants", default="off,on,quiet", help="of off, on, quiet")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not Path("/usr/sbin/smtp-source").exists():
        print("needs /usr/sbin/smtp-source (apt-get install postfix)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="postroom-bench-metrics-"))
    rates: dict[str, list[float]] = {v: [] for v in variants}
    lines: dict[str, float] = {}
    try:
        for round_no in range(args.rounds):
            shift = round_no % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                rate, lines[variant] = measure(
                    tmp / f"{variant}{round_no}", variant, args.messages, args.workers
                )
                rates[variant].append(rate)
                print(
                    f"round {round_no + 1} {variant}: {rate:,.0f} msg/s,"
                    f" {lines[variant]:.2f} log lines/message",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {v: statistics.median(r) for v, r in rates.items()}
    out: dict[str, object] = {"messages": args.messages, "workers": args.workers}
    for v in variants:
        out[f"{v}_msg_s"] = round(med[v])
        out[f"{v}_range"] = [round(min(rates[v])), round(max(rates[v]))]
        out[f"{v}_log_lines_per_message"] = round(lines[v], 2)
    for v in ("on", "quiet"):
        if v in med and "off" in med:
            out[f"{v}_over_off"] = round(med[v] / med["off"], 3)
    out["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
