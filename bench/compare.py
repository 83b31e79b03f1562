#!/usr/bin/env python3
"""The quiet pair of run_bench.py's figure (2), working tree against a git revision:

    python3 bench/compare.py 541d98c            # 5 runs of each, alternating
    python3 bench/compare.py HEAD~3 --runs 9

Both versions run alternately on the same machine, so a change is measured against
its baseline in one session. Prints the end-to-end msg/s of every run, the medians
and their ratio. Run by hand, not part of the test suite; stdlib + pyzmq only.
"""

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
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
    return rb.Scripts(dest / rb.SCRIPTS[0], dest / rb.SCRIPTS[1], revision)


def quiet_rate(scripts):
    """One run of figure (2): end-to-end msg/s."""
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        try:
            with rb.Pair(tmp, scripts, *RECEIVER_ARGS) as pair:
                rate, _ = rb.end_to_end(pair, WORKERS * MESSAGES,
                                        ["--workers", WORKERS, "--messages", MESSAGES,
                                         "--delay", "0", "--quiet"], TIMEOUT)
                return rate
        finally:
            rb.kill_all()


def main(argv=None):
    """Run both versions alternately and print the medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revision", help="git revision to compare the working tree with")
    p.add_argument("--runs", type=int, default=5, help="runs of each version (default 5)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-code-") as code:
        try:
            versions = {"baseline": scripts_at(a.revision, Path(code) / "baseline"),
                        "working tree": rb.snapshot(Path(code) / "current")}
        except subprocess.CalledProcessError as exc:
            print(f"cannot read {a.revision}: {exc.stderr.decode().strip()}", file=sys.stderr)
            return 2
        rates = {name: [] for name in versions}
        for number in range(1, a.runs + 1):
            for name, scripts in versions.items():
                try:
                    rates[name].append(quiet_rate(scripts))
                except rb.BenchError as exc:
                    print(f"run {number}, {name}: {exc}", file=sys.stderr)
    for name, scripts in versions.items():
        shown = " ".join(f"{rate / 1000:.0f}k" for rate in rates[name])
        median = statistics.median(rates[name]) if rates[name] else 0.0
        print(f"{name:<13} {scripts.description}: median {median:,.0f} msg/s ({shown})")
    if rates["baseline"] and rates["working tree"]:
        ratio = statistics.median(rates["working tree"]) / statistics.median(rates["baseline"])
        print(f"ratio working tree / baseline: {ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
