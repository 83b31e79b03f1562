#!/usr/bin/env python3
"""The quiet flood of run_bench.py's figure (2), with the live-metrics endpoint off and on:

    python3 bench/metrics_bench.py            # 5 runs of each, alternating
    python3 bench/metrics_bench.py --runs 9

"on": both scripts run with --metrics-port, and a scraper reads both endpoints every
SCRAPE_INTERVAL (twice as often as a Prometheus scraping every second). Both variants
run alternately on the same machine, from the same snapshot of the working tree.
Prints, for every run, the end-to-end msg/s (from the sender's start: it includes
importing prometheus-client, about 15-40 ms) and the receiver's own rate of the run (first
message to last: the data path alone) and the CPU time both processes used per message
(start-up included; steadier than a rate on a busy machine), then the medians and their
ratios (issue 24: on / off >= 0.95). Needs prometheus-client (requirements-metrics.txt).
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402
from compare import MESSAGES, RECEIVER_ARGS, TIMEOUT, WORKERS  # noqa: E402

SCRAPE_INTERVAL = 0.5  # seconds between two scrapes of each endpoint


def children_cpu():
    """CPU seconds (user + system) of the child processes reaped so far; 0 on Windows."""
    if os.name == "nt":
        return 0.0
    import resource  # POSIX only
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scrape_until(stop, ports, scrapes):
    """Scrape every port each SCRAPE_INTERVAL until `stop`; count the answers."""
    while not stop.wait(SCRAPE_INTERVAL):
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2) as reply:
                    reply.read()
                scrapes.append(port)
            except OSError:
                pass  # not up yet, or gone


def flood_rate(scripts, metrics):
    """One run of figure (2), with or without the endpoints: (end-to-end msg/s, the
    receiver's msg/s of the run, CPU us per message, scrapes answered)."""
    ports = (rb.free_port(), rb.free_port()) if metrics else ()
    receiver_args = [*RECEIVER_ARGS]
    sender_args = ["--workers", WORKERS, "--messages", MESSAGES, "--delay", "0", "--quiet"]
    if metrics:
        receiver_args += ["--metrics-port", ports[0], "--metrics-hold", "0"]
        sender_args += ["--metrics-port", ports[1], "--metrics-hold", "0"]
    stop, scrapes = threading.Event(), []
    scraper = threading.Thread(target=scrape_until, args=(stop, ports, scrapes),
                               name="scraper", daemon=True)
    cpu_before = children_cpu()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        try:
            with rb.Pair(tmp, scripts, *receiver_args) as pair:
                scraper.start()
                rate, _ = rb.end_to_end(pair, WORKERS * MESSAGES, sender_args, TIMEOUT)
                in_run = rb.runs0(pair.receiver.summary())["rate_msg_s"]
        finally:
            stop.set()
            scraper.join(5)
            rb.kill_all()  # both reaped: their CPU time is in children_cpu()
    cpu_us = (children_cpu() - cpu_before) / (WORKERS * MESSAGES) * 1e6
    return rate, in_run, cpu_us, len(scrapes)


def main(argv=None):
    """Run both variants alternately and print the medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each variant (default 5)")
    a = p.parse_args(argv)
    rates = {"off": [], "on": []}
    in_run = {"off": [], "on": []}
    cpu = {"off": [], "on": []}
    scraped = []
    with tempfile.TemporaryDirectory(prefix="bench-code-") as code:
        scripts = rb.snapshot(Path(code) / "current")
        for number in range(1, a.runs + 1):
            for name in rates:
                try:
                    rate, run_rate, cpu_us, scrapes = flood_rate(scripts,
                                                                 metrics=name == "on")
                except rb.BenchError as exc:
                    print(f"run {number}, {name}: {exc}", file=sys.stderr)
                    continue
                rates[name].append(rate)
                in_run[name].append(run_rate)
                cpu[name].append(cpu_us)
                if name == "on":
                    scraped.append(scrapes)
    print(f"code: {scripts.description}")
    for title, figures in (("end to end", rates), ("receiver's rate of the run", in_run)):
        for name, found in figures.items():
            shown = " ".join(f"{rate / 1000:.0f}k" for rate in found)
            median = statistics.median(found) if found else 0.0
            print(f"{title}, metrics {name:<3}: median {median:,.0f} msg/s ({shown})")
        if figures["off"] and figures["on"]:
            ratio = statistics.median(figures["on"]) / statistics.median(figures["off"])
            print(f"{title}, ratio on / off: {ratio:.2f}x (issue 24: >= 0.95x)")
    for name, found in cpu.items():
        shown = " ".join(f"{us:.2f}" for us in found)
        median = statistics.median(found) if found else 0.0
        print(f"CPU of both processes, metrics {name:<3}: median {median:.2f} us/msg ({shown})")
    if cpu["off"] and cpu["on"]:
        ratio = statistics.median(cpu["on"]) / statistics.median(cpu["off"])
        print(f"CPU per message, on / off: {ratio:.3f}x (the same work: 1.00x)")
    print(f"scrapes answered per 'on' run: {scraped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
