#!/usr/bin/env python3
"""The quiet pair of run_bench.py's figure (2), working tree against a git revision:

    python3 bench/compare.py 541d98c            # 5 runs of each, alternating
    python3 bench/compare.py HEAD~3 --runs 9
    python3 bench/compare.py 541d98c --confirm  # figure (2c): both senders with --confirm

Both versions run alternately on the same machine, so a change is measured against
its baseline in one session. Prints the end-to-end msg/s of every run, the medians
and their ratio, and each side's CPU time per message (user + system, all threads).
Run by hand, not part of the test suite; stdlib + pyzmq only.
"""

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402

WORKERS, MESSAGES = 50, 10_000  # figure (2)'s sender
RECEIVER_ARGS = ("--quiet", "--processing-time", "0", "--no-file-log")
TIMEOUT = 120  # seconds one run may take before it counts as failed


def scripts_at(revision, dest):
    """The scripts and the package as they are at `revision`, extracted into `dest`."""
    dest.mkdir(parents=True)
    listed = subprocess.run(["git", "ls-tree", "--name-only", revision, "--", *rb.CODE],
                            cwd=rb.ROOT, capture_output=True, check=True, timeout=10).stdout
    archive = subprocess.run(["git", "archive", revision, "--", *listed.decode().split()],
                             cwd=rb.ROOT, capture_output=True, check=True, timeout=30).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    rb.compile_package(dest)
    return rb.Scripts(dest / rb.SCRIPTS[0], dest / rb.SCRIPTS[1], revision)


def quiet_run(scripts, *extra):
    """One run of figure (2): end-to-end msg/s, and the CPU time (user + system, all
    threads) per message of the receiver (from its ready line to its [RUN] line) and of
    the sender (its whole life, start-up included), in µs."""
    planned = WORKERS * MESSAGES
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        try:
            with rb.Pair(tmp, scripts, *RECEIVER_ARGS) as pair:
                ready_cpu = rb.cpu_seconds(pair.receiver.pid)
                started = time.time()
                sender = pair.sender("--workers", WORKERS, "--messages", MESSAGES,
                                     "--delay", "0", "--quiet", *extra)
                seen, _ = pair.receiver.wait_for(b"[RUN]", TIMEOUT, "[RUN] line")
                receiver_cpu = rb.cpu_seconds(pair.receiver.pid) - ready_cpu
                sender_cpu = rb.reap_cpu_seconds(sender, 30)
                pair.receiver.stop(30)
                run = rb.runs0(pair.receiver.summary())
                if run["received"] != planned or not run["complete"]:
                    raise rb.BenchError(f"run incomplete: received {run['received']}"
                                        f" of {planned}")
                return (planned / (seen - started), 1e6 * receiver_cpu / planned,
                        1e6 * sender_cpu / planned)
        finally:
            rb.kill_all()


def main(argv=None):
    """Run both versions alternately and print the medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revision", help="git revision to compare the working tree with")
    p.add_argument("--runs", type=int, default=5, help="runs of each version (default 5)")
    p.add_argument("--confirm", action="store_true",
                   help="figure (2c) instead: both senders with --confirm")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-code-") as code:
        try:
            versions = {"baseline": scripts_at(a.revision, Path(code) / "baseline"),
                        "working tree": rb.snapshot(Path(code) / "current")}
        except subprocess.CalledProcessError as exc:
            print(f"cannot read {a.revision}: {exc.stderr.decode().strip()}", file=sys.stderr)
            return 2
        runs = {name: [] for name in versions}
        extra = ["--confirm"] if a.confirm else []
        for number in range(1, a.runs + 1):
            for name, scripts in versions.items():
                try:
                    runs[name].append(quiet_run(scripts, *extra))
                except rb.BenchError as exc:
                    print(f"run {number}, {name}: {exc}", file=sys.stderr)
    print(f"machine: {rb.machine()}")
    medians = {}
    for name, scripts in versions.items():
        rates = [r[0] for r in runs[name]]
        medians[name] = [statistics.median(col) if col else 0.0 for col in
                         (rates, [r[1] for r in runs[name]], [r[2] for r in runs[name]])]
        shown = " ".join(f"{rate / 1000:.0f}k" for rate in rates)
        rate, receiver_us, sender_us = medians[name]
        print(f"{name:<13} {scripts.description}: median {rate:,.0f} msg/s ({shown});"
              f" CPU per message: receiver {receiver_us:.2f} µs, sender {sender_us:.2f} µs")
    if runs["baseline"] and runs["working tree"]:
        (rate, receiver_us, sender_us), (rate0, receiver0, sender0) = (
            medians["working tree"], medians["baseline"])
        print(f"ratio working tree / baseline: {rate / rate0:.2f}× (msg/s);"
              f" CPU per message: receiver {receiver_us / receiver0:.2f}×,"
              f" sender {sender_us / sender0:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
