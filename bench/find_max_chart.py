#!/usr/bin/env python3
"""A chart of a --find-max search, from the sender's --json summary (issue 25).

    python3 bench/find_max_chart.py SENDER.json [--output bench/find_max.png]

Each step is a point: its target rate against the receivers' p99 of latency_ms,
filled when it held, hollow when it failed, numbered in the order the search ran
them (each failed step's checks are listed under the chart). The p99 gate is a
dashed line, the answer a vertical one. Needs matplotlib (bench/requirements.txt).
"""

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "find_max.png"


def parse_args(argv=None):
    """The command line: the JSON summary to read, the PNG to write."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summary", help="the sender's --json summary of a --find-max search")
    p.add_argument("--output", default=str(OUTPUT), help="the PNG to write")
    return p.parse_args(argv)


def points(search):
    """(step, rate, p99 ms or None, held, failed checks) of every step."""
    result = []
    for step in search["steps"]:
        lat = step["receiver_report"].get("latency_ms") or {}
        result.append((step["step"], step["target_msg_s"], lat.get("p99"), step["held"],
                       [f["check"] for f in step["failed"]]))
    return result


def draw(search, path):
    """Draw the chart of one search into `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    steps = [p for p in points(search) if p[2] is not None]
    for number, rate, p99, held, failed in steps:
        ax.plot(rate, p99, "o", color="tab:green" if held else "tab:red",
                fillstyle="full" if held else "none", markersize=8)
        ax.annotate(f"{number}", (rate, p99), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    gate = search["gates"]["max_p99_ms"]
    if gate is not None:
        ax.axhline(gate, linestyle="--", color="tab:orange", label=f"gate: p99 <= {gate:g} ms")
    answer = search["max_rate_msg_s"]
    if answer is not None:
        ax.axvline(answer, color="tab:blue", label=f"answer: {answer:g} msg/s")
    ax.plot([], [], "o", color="tab:green", label="step held")
    ax.plot([], [], "o", color="tab:red", fillstyle="none", label="step failed")
    ax.set_yscale("log")
    ax.set_xlabel("target rate of the step, msg/s (open loop)")
    ax.set_ylabel("receivers' p99 latency, ms")
    ax.set_title(f"--find-max: {len(search['steps'])} steps, {search['outcome']}"
                 f" (limit: {search['limit'] or '-'})", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    failures = "; ".join(f"{number}: {', '.join(failed)}" for number, _, _, held, failed
                         in points(search) if not held)
    fig.text(0.01, 0.01, f"failed steps (checks): {failures or 'none'}"[:150], fontsize=7,
             alpha=0.8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    """Read the summary, draw the chart; 1 with a reason when it cannot."""
    args = parse_args(argv)
    try:
        search = json.loads(Path(args.summary).read_text(encoding="utf-8"))["find_max"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"find_max_chart: {args.summary} is no --find-max summary ({exc})",
              file=sys.stderr)
        return 1
    try:
        draw(search, args.output)
    except ImportError:
        print("find_max_chart: needs matplotlib (pip install -r bench/requirements.txt)",
              file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
