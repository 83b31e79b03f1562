#!/usr/bin/env python3
"""Benchmark of one run across processes (issue 23). Run by hand, not part of the tests:

    python3 bench/instances_bench.py            # about 3 minutes
    python3 bench/instances_bench.py --quick    # smaller runs: a smoke test

Against two receivers on this machine, the sender with --processes 1 and 2 (the same
workers in all): the flood's rate end to end, and the paced maximum, the highest
--rate of a ladder that the run keeps (every message received, at least 95 % of the
rate achieved, send lag p99 at most PACED_LAG_P99_MS past a PACED_WARMUP). Prints a
markdown table with the machine; the figures go into bench/README.md by hand.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from run_bench import BenchError, Proc, kill_all, machine  # noqa: E402
from pushpull.cli import free_port  # noqa: E402

WORKERS = 20  # worker threads in all, split over the processes
PACED_LAG_P99_MS = 10.0  # ms: the send lag p99 a kept rate may have
PACED_SECONDS = 3.0  # seconds of schedule per paced step
# Seconds kept out of the send lag: a child spawned late on a busy machine would
# otherwise show its start-up, not the pace it keeps.
PACED_WARMUP = 1.0
STEP_ATTEMPTS = 2  # runs of a paced step before it counts as not kept (a shared machine)
LADDER = (10_000, 20_000, 40_000, 60_000, 80_000, 120_000, 160_000)  # msg/s tried, in order
# --run-timeout 2: a receiver whose share of a flood lacks a worker's END frame (PUSH
# deals them by turn, and a full pipe is skipped) reports it 2 s after the last message;
# the figures are the receivers' own arrival spans, without those 2 s.
RECEIVER_ARGS = ("--processing-time", "0", "--no-file-log", "--quiet", "--run-timeout", "2",
                 "--bind", "127.0.0.1")


def start_receivers(workdir, count=2):
    """Two quiet receivers on free ports, ready."""
    receivers = []
    for k in range(count):
        port = free_port()
        proc = Proc([ROOT / "async-socket-receiver.py", "--port", port, *RECEIVER_ARGS],
                    workdir, f"receiver{k}-{port}")
        proc.endpoint = f"tcp://127.0.0.1:{port}"
        proc.wait_for(b"Server is running", 20)
        receivers.append(proc)
    return receivers


def run_sender(workdir, receivers, processes, name, *load):
    """One run of the sender with --processes P; returns its JSON summary."""
    connect = [a for r in receivers for a in ("--connect", r.endpoint)]
    sender = Proc([ROOT / "async-socket-sender.py", *connect, "--processes", processes,
                   "--workers", WORKERS // processes, "--quiet", "--report-timeout", "30",
                   "--json", Path(workdir) / f"{name}.json", *load], workdir, name)
    status = sender.wait(300)
    data = json.loads((Path(workdir) / f"{name}.json").read_text())
    if status not in (0, 1):
        raise BenchError(f"{name} exited {status}: {sender.last_lines()}")
    return data


def run_rate(data):
    """The whole run's rate end to end, by the receivers: received over the longest span."""
    reports = data["receiver_report"].get("reports") or []
    spans = [r["received"] / r["rate_msg_s"] for r in reports if r.get("rate_msg_s")]
    received = sum(r["received"] for r in reports)
    return received / max(spans) if spans else 0.0, received


def lag_p99(data):
    """The run's send lag p99 (ms): the combined one with --processes > 1."""
    lag = data.get("send_lag_ms") or {}
    return lag.get("p99", float("inf"))


def flood(workdir, receivers, processes, messages, runs):
    """Median end-to-end rate of a flood of WORKERS x messages."""
    rates = []
    for k in range(runs):
        data = run_sender(workdir, receivers, processes, f"flood-p{processes}-{k}",
                          "--messages", messages, "--delay", "0")
        rate, received = run_rate(data)
        if received != WORKERS * messages:
            raise BenchError(f"flood P={processes}: {received} of {WORKERS * messages}"
                             f" received ({data['receiver_report'].get('reason')})")
        rates.append(rate)
    return statistics.median(rates)


def paced_maximum(workdir, receivers, processes, ladder):
    """The highest rate of `ladder` the run keeps; and each step's figures."""
    kept, steps = 0, []
    for target in ladder:
        for attempt in range(STEP_ATTEMPTS):
            data = run_sender(workdir, receivers, processes,
                              f"paced-p{processes}-{target}-{attempt}", "--rate", target,
                              "--duration", PACED_SECONDS, "--warmup", PACED_WARMUP)
            rate, received = run_rate(data)
            planned = data["planned"]
            ok = received == planned and rate >= 0.95 * target and \
                lag_p99(data) <= PACED_LAG_P99_MS
            steps.append((target, round(rate), lag_p99(data), received, planned, ok))
            if ok:
                break
        if not ok:
            break
        kept = target
    return kept, steps


def main(argv=None):
    """Measure, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller runs: a smoke test")
    p.add_argument("--runs", type=int, default=3, help="flood runs per figure (median)")
    a = p.parse_args(argv)
    messages = 2_000 if a.quick else 20_000
    ladder = LADDER[:3] if a.quick else LADDER
    runs = 1 if a.quick else a.runs
    lines = [machine(), "", "| figure | --processes 1 | --processes 2 | unit |",
             "|---|---:|---:|---|"]
    try:
        with tempfile.TemporaryDirectory(prefix="pushpull-bench-") as workdir:
            receivers = start_receivers(workdir)
            floods = [flood(workdir, receivers, p, messages, runs) for p in (1, 2)]
            paced = [paced_maximum(workdir, receivers, p, ladder) for p in (1, 2)]
            for receiver in receivers:
                receiver.stop()
    finally:
        kill_all()
    lines.append(f"| flood, {WORKERS} workers x {messages}, 2 receivers, end to end"
                 f" | {floods[0]:,.0f} | {floods[1]:,.0f} | msg/s |")
    lines.append(f"| paced maximum (all received, >= 95 % of --rate, send lag p99 <="
                 f" {PACED_LAG_P99_MS:g} ms) | {paced[0][0]:,} | {paced[1][0]:,} | msg/s |")
    lines.append("")
    lines.append("Paced steps (target, achieved, send lag p99 ms, received/planned, kept):")
    for processes, (_, steps) in zip((1, 2), paced):
        for target, rate, lag, received, planned, ok in steps:
            lines.append(f"- P={processes}: {target:,} -> {rate:,} msg/s, lag p99 {lag} ms,"
                         f" {received}/{planned}, {'kept' if ok else 'not kept'}")
    lines.append(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
