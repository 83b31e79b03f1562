#!/usr/bin/env python3
"""The sender's rate ceiling (issue 22): how fast --rate holds within 1 % of its target.

    python3 bench/rate_ceiling.py                      # the working tree, default rates
    python3 bench/rate_ceiling.py --rates 100000 200000 --baseline 6ef716a

For each rate, the sender sends --rate R for --duration into a bare pyzmq PULL sink
(bench/raw_pushpull.py pull), which times its first frame to its last. Printed per
rate: the rate the sink measured, its error against the target, and the sender's CPU
(user + system, all its threads, start-up included) as a share of one core over the
run: once the sender's threads need a whole core (their GIL), the rate falls behind.
The ceiling is the highest rate tried whose median error is within 1 %. With
--baseline REV, each rate runs alternately for a git revision too.
Run by hand, not part of the test suite; stdlib + pyzmq only.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import run_bench as rb  # noqa: E402

RATES = (50_000, 100_000, 150_000, 200_000, 250_000, 300_000)  # msg/s tried by default
WORKERS = 50  # sender workers, as figure (2)
SECONDS = 3.0  # seconds of schedule per run
TOLERANCE = 1.0  # percent: the target of issue 22


def one_rate(scripts, rate, seconds, workers):
    """One run at `rate`: (msg/s the sink measured, sender CPU as a share of one core)."""
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
        try:
            port = rb.free_port()
            planned = workers * round(rate * seconds / workers)
            sink = rb.Proc([rb.RAW, "pull", port, planned], tmp, "sink")
            sink.wait_for(b"READY", 10)
            sender = rb.Proc([scripts.sender, "--connect", f"tcp://127.0.0.1:{port}",
                              "--workers", workers, "--rate", rate, "--duration", seconds,
                              "--quiet"], tmp, "sender")
            _, line = sink.wait_for(b"msg_per_s", seconds * 10 + 30, "sink result")
            cpu = rb.reap_cpu_seconds(sender, 30)
            result = rb.json.loads(line)
            if "error" in result:
                raise rb.BenchError(result["error"])
            return result["msg_per_s"], cpu / max(seconds, result["seconds"])
        finally:
            rb.kill_all()


def main(argv=None):
    """Run every rate (alternately with the baseline), print the table and the ceiling."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    p.add_argument("--runs", type=int, default=3, help="runs per rate (default 3)")
    p.add_argument("--seconds", type=float, default=SECONDS)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--baseline", metavar="REV", help="git revision to run alternately")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-code-") as code:
        versions = {"working tree": rb.snapshot(Path(code) / "current")}
        if a.baseline:
            versions["baseline"] = compare.scripts_at(a.baseline, Path(code) / "baseline")
        results = {(name, rate): [] for name in versions for rate in a.rates}
        for rate in a.rates:
            for _ in range(a.runs):
                for name, scripts in versions.items():
                    try:
                        results[name, rate].append(one_rate(scripts, rate, a.seconds,
                                                            a.workers))
                    except rb.BenchError as exc:
                        print(f"{name} at {rate}: {exc}", file=sys.stderr)
    print(f"machine: {rb.machine()}")
    print(f"{a.workers} workers, {a.seconds:g} s per run, median of {a.runs} runs\n")
    print("| code | target msg/s | measured msg/s | error | sender CPU (cores) |")
    print("|---|---:|---:|---:|---:|")
    for name, scripts in versions.items():
        ceiling = None
        for rate in a.rates:
            runs = results[name, rate]
            if not runs:
                continue
            measured = statistics.median(r[0] for r in runs)
            error = 100 * (measured / rate - 1)
            cpu = statistics.median(r[1] for r in runs)
            print(f"| {scripts.description} | {rate:,} | {measured:,.0f} | {error:+.2f} %"
                  f" | {cpu:.2f} |")
            if abs(error) <= TOLERANCE and (ceiling is None or rate > ceiling):
                ceiling = rate
        print(f"\n{name}: within {TOLERANCE:g} % up to"
              f" {f'{ceiling:,} msg/s' if ceiling else 'none of the rates tried'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
