"""Issue 17: what the metrics cost. SMTP accept rate with metrics scraped every second
against metrics off (no ``[listen] http``), on servers started afresh, in turns.

    python bench/metrics.py [--messages 4000] [--rounds 5] [--workers 1]

Each round starts one server per variant (off, then on; the order alternates between rounds),
sends an unmeasured warm-up, then measures smtp-source (20 sessions, 1 KiB, one message per
connection) twice and keeps the median (sender checks off: there is no DNS here); with metrics
on, a thread GETs /metrics once a second throughout and the last scrape must count every
message. Prints the medians, the range and on/off as JSON. Not run by CI. Needs
/usr/sbin/smtp-source (apt package postfix).
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


def server(base: Path, metrics: bool, workers: int) -> tuple[Postroom, int | None]:
    srv = Postroom(base)
    http = free_port() if metrics else None
    text = srv.config.read_text().replace('log_level = "warning"\n', f"workers = {workers}\n")
    if http is not None:
        text = text.replace("[limits]", f'http = ["{HOST}:{http}"]\n[limits]')
    # No SPF/DKIM/DMARC checks: without a DNS server to ask they would wait for time-outs,
    # and what is measured here is the cost of the metrics.
    srv.config.write_text(text + "[auth]\nchecks = false\n")
    return srv, http


def measure(base: Path, metrics: bool, messages: int, workers: int) -> float:
    srv, http = server(base, metrics, workers)
    srv.start()
    scraper = None
    try:
        accept_rate(srv.port, max(200, messages // 5))  # warm-up, unmeasured
        if http is not None:
            scraper = Scraper(http)
            scraper.scrape()
            before = scraper.accepted
            scraper.start()
        rates = [accept_rate(srv.port, messages) for _ in range(2)]
        if scraper is not None:
            scraper.halt.set()
            scraper.join()
            scraper.scrape()
            if scraper.accepted - before != 2 * messages:
                raise RuntimeError(f"metrics counted {scraper.accepted - before} messages")
        return statistics.median(rates)
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if not Path("/usr/sbin/smtp-source").exists():
        print("needs /usr/sbin/smtp-source (apt-get install postfix)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="postroom-bench-metrics-"))
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_no in range(args.rounds):
            order = ["off", "on"] if round_no % 2 == 0 else ["on", "off"]
            for variant in order:
                rate = measure(
                    tmp / f"{variant}{round_no}", variant == "on", args.messages, args.workers
                )
                rates[variant].append(rate)
                print(f"round {round_no + 1} metrics {variant}: {rate:,.0f} msg/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(
        json.dumps(
            {
                "messages": args.messages,
                "workers": args.workers,
                "off_msg_s": round(off),
                "on_msg_s": round(on),
                "off_range": [round(min(rates["off"])), round(max(rates["off"]))],
                "on_range": [round(min(rates["on"])), round(max(rates["on"]))],
                "on_over_off": round(on / off, 3),
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
