#!/usr/bin/env python3
"""The pair as a load tool (issue 15): rate accuracy, latency against rate, both formats.

    python3 bench/load_bench.py           # about 2-3 minutes; writes LOAD.md and the chart
    python3 bench/load_bench.py --quick   # shorter runs, nothing written unless --output

Figures, each from the real scripts on free 127.0.0.1 ports:
- (8) rate accuracy: the sender at --rate 10000 into a bare pyzmq PULL sink, which
  times the first to the last frame; target within 1 % of the rate asked for.
- (9) latency against rate: the pair at 1k, 10k, 50k and 100k msg/s (open loop,
  --warmup kept out), the receiver's latency_ms (from the intended send time)
  p50 / p99 / p99.9, beside raw pyzmq threads paced the same way as the floor.
- (10) the quiet pair of figure (2) in both --format binary and --format text.
The chart (latency_vs_rate.png) needs matplotlib (bench/requirements.txt); without it
the tables are still printed and written.
"""

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402

RATES = (1_000, 10_000, 50_000, 100_000)  # msg/s of figure (9)
WORKERS = 10  # sender workers (and raw pyzmq threads) of figures (8) and (9)
RATE_SECONDS = 2.5  # seconds of schedule per rate in (9)
IDLE_WAIT = 10.0  # seconds to wait, before each measurement, for other programs to go idle
WARMUP = 0.5  # seconds of (9)'s runs kept out of its latency figures
ACCURACY_RATE, ACCURACY_SECONDS = 10_000, 5.0  # figure (8)
QUIET_WORKERS, QUIET_MESSAGES = 50, 10_000  # figure (10), as figure (2)
CHART = rb.BENCH / "latency_vs_rate.png"
FOOTER_WIDTH = 160  # characters per line of the chart's footer (the machine), at 6 pt: 7 in wide
FOOTER_LINE_HEIGHT = 0.022  # a footer line's height, as a fraction of the chart's
OUTPUT = rb.BENCH / "LOAD.md"


def rate_accuracy(tmp, scripts, seconds):
    """(8): the rate a bare PULL sink measures, first frame to last, and the sender's lag."""
    port, planned = rb.free_port(), int(ACCURACY_RATE * seconds)
    sink = rb.Proc([rb.RAW, "pull", port, planned], tmp, "sink")
    sink.wait_for(b"READY", 10)
    json_path = Path(tmp) / "sender.json"
    sender = rb.Proc([scripts.sender, "--connect", f"tcp://127.0.0.1:{port}", "--workers",
                      WORKERS, "--rate", ACCURACY_RATE, "--duration", seconds, "--quiet",
                      "--json", json_path], tmp, "sender")
    _, line = sink.wait_for(b"msg_per_s", seconds + 30, "sink result")
    sender.wait(30)
    measured = rb.json.loads(line)["msg_per_s"]
    lag = rb.json.loads(json_path.read_text())["send_lag_ms"]
    return {"measured": measured, "error_pct": 100 * (measured / ACCURACY_RATE - 1),
            "lag_p99": lag["p99"], "lag_max": lag["max"]}


def pair_latency(tmp, scripts, rate, seconds):
    """(9): the pair at `rate`: the receiver's latency_ms and the sender's send lag."""
    planned = WORKERS * round(rate * seconds / WORKERS)
    with rb.Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log") as pair:
        json_path = Path(tmp) / "sender.json"
        sender = pair.sender("--workers", WORKERS, "--rate", rate, "--duration", seconds,
                             "--warmup", WARMUP, "--quiet", "--json", json_path)
        pair.receiver.wait_for(b"[RUN]", seconds + 60, "[RUN] line")
        sender.wait(30)
        pair.receiver.stop(30)
        run = rb.runs0(pair.receiver.summary())
    if run["received"] != planned:
        raise rb.BenchError(f"run at {rate} msg/s: received {run['received']} of {planned}")
    lag = rb.json.loads(json_path.read_text())["send_lag_ms"]
    return {**run["latency_ms"], "raw_max": run["latency_raw_ms"]["max"],
            "lag_p99": lag["p99"]}


def raw_latency(tmp, rate, seconds, size):
    """The floor of (9): raw pyzmq threads paced like the pair, latency from intended times."""
    port, per_thread = rb.free_port(), round(rate * seconds / WORKERS)
    result = rb.run_raw(tmp, ["lat-pull", port, per_thread * WORKERS],
                        ["rate-push", port, WORKERS, rate, per_thread, size], b"p99_ms",
                        seconds + 60)
    return {"p50": result["p50_ms"], "p99": result["p99_ms"], "p99_9": result["p99_9_ms"],
            "max": result["max_ms"]}


def quiet_pair(tmp, scripts, fmt):
    """(10): figure (2)'s quiet pair in one --format, end to end msg/s."""
    with rb.Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log") as pair:
        rate, _ = rb.end_to_end(pair, QUIET_WORKERS * QUIET_MESSAGES,
                                ["--workers", QUIET_WORKERS, "--messages", QUIET_MESSAGES,
                                 "--delay", "0", "--quiet", "--format", fmt], 180)
    return rate


def measure(what, log, func, *args):
    """Run one measurement in its own temporary directory; None (logged) if it failed."""
    rb.wait_for_quiet(IDLE_WAIT, log)
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        started = time.monotonic()
        try:
            return func(tmp, *args)
        except rb.BenchError as exc:
            log(f"  {what}: FAILED: {exc}")
            return None
        finally:
            rb.kill_all()
            log(f"  {what:<28} {time.monotonic() - started:5.1f} s")


def median_of(runs, measurement):
    """Each figure's median over `runs` calls of measurement() ({key: value}; None: failed)."""
    results = [r for r in (measurement() for _ in range(runs)) if r]
    if not results:
        return None
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def latency_table(pair, raw):
    """Figure (9) as markdown."""
    lines = ["| rate (msg/s) | pair p50 | pair p99 | pair p99.9 | raw p50 | raw p99 | raw p99.9"
             " | pair send lag p99 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in RATES:
        ours, floor = pair.get(rate), raw.get(rate)
        cells = [f"{ours[k]:.3f}" if ours else "n/a" for k in ("p50", "p99", "p99_9")]
        cells += [f"{floor[k]:.3f}" if floor else "n/a" for k in ("p50", "p99", "p99_9")]
        cells.append(f"{ours['lag_p99']:.3f}" if ours else "n/a")
        lines.append(f"| {rate:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_chart(pair, raw, path, machine):
    """Figure (9) as a chart: latency (log) against rate (log); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for key, label, color in (("p50", "p50", "tab:blue"), ("p99", "p99", "tab:orange"),
                              ("p99_9", "p99.9", "tab:red")):
        for source, style, who in ((pair, "-o", "pair"), (raw, "--x", "raw pyzmq")):
            rates = [r for r in RATES if source.get(r)]
            ax.plot(rates, [source[r][key] for r in rates], style, color=color,
                    label=f"{who} {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(RATES, [f"{r // 1000}k" for r in RATES])
    ax.set_xlabel("rate, msg/s (open loop, 10 workers)")
    ax.set_ylabel("latency from the intended send time, ms")
    ax.set_title("Latency against rate: the pair and raw pyzmq", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    # The whole machine line, wrapped: cut at a width, it lost the load average.
    footer = textwrap.wrap(machine, FOOTER_WIDTH) or [""]
    fig.text(0.01, 0.01, "\n".join(footer), fontsize=6, alpha=0.7, va="bottom")
    fig.tight_layout(rect=(0, FOOTER_LINE_HEIGHT * (len(footer) + 0.5), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per rate, 1 run of everything")
    p.add_argument("--runs", type=int, default=3,
                   help="runs of each rate and of each quiet pair; medians (default 3)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown file to write (default {OUTPUT.name}; none with --quick)")
    a = p.parse_args(argv)
    seconds = 1.0 if a.quick else RATE_SECONDS
    runs = 1 if a.quick else max(1, a.runs)
    output = a.output or (None if a.quick else OUTPUT)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    machine = rb.machine()
    log(f"Machine: {machine}")
    code_dir = tempfile.TemporaryDirectory(prefix="load-bench-code-")
    scripts = rb.snapshot(code_dir.name)
    size = rb.frame_size()
    try:
        accuracy = measure("rate accuracy", log, rate_accuracy, scripts,
                           1.0 if a.quick else ACCURACY_SECONDS)
        pair, raw = {}, {}
        for rate in RATES:
            pair[rate] = median_of(runs, lambda: measure(f"pair at {rate}", log, pair_latency,
                                                         scripts, rate, seconds))
            raw[rate] = median_of(runs, lambda: measure(f"raw at {rate}", log, raw_latency,
                                                        rate, seconds, size))
        quiet = {fmt: [v for v in (measure(f"quiet {fmt}", log, quiet_pair, scripts, fmt)
                                   for _ in range(runs)) if v]
                 for fmt in ("binary", "text")}
    finally:
        rb.kill_all()
        code_dir.cleanup()
    drawn = draw_chart(pair, raw, CHART, machine) if output else False
    text = report(machine, scripts, accuracy, pair, raw, quiet, seconds, runs, drawn)
    print(text)
    if output:
        output.write_text(text, encoding="utf-8")
        log(f"written to {output}{' and ' + CHART.name if drawn else ''}")
    return 0


def report(machine, scripts, accuracy, pair, raw, quiet, seconds, runs, drawn):
    """The markdown written to LOAD.md."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["# Load benchmark: latest run", "", "`python3 bench/load_bench.py`", "",
             f"Machine: {machine}", f"Code: {scripts.description}, {when}", ""]
    if accuracy:
        verdict = "pass" if abs(accuracy["error_pct"]) <= 1.0 else "FAIL"
        lines += [f"(8) rate accuracy: asked {ACCURACY_RATE:,} msg/s for {ACCURACY_SECONDS:g} s"
                  f" ({WORKERS} workers), a bare PULL sink measured"
                  f" {accuracy['measured']:,.0f} msg/s ({accuracy['error_pct']:+.2f} %,"
                  f" target ±1 %: {verdict}); send lag p99 {accuracy['lag_p99']:.3f} ms,"
                  f" max {accuracy['lag_max']:.3f} ms.", ""]
    lines += [f"(9) latency against rate, ms, each the median of {runs} runs: {WORKERS} workers,"
              f" {seconds:g} s per rate (first {WARMUP:g} s kept out), latency_ms from the"
              " intended send time; raw pyzmq threads paced and stamped the same way as the"
              " floor.", "",
              latency_table(pair, raw), ""]
    if drawn:
        lines += [f"![latency against rate]({CHART.name})", ""]
    lines += [f"(10) the quiet pair of figure (2), {QUIET_WORKERS}x{QUIET_MESSAGES}, end to end,"
              " median msg/s:", ""]
    for fmt, values in quiet.items():
        shown = f"{statistics.median(values):,.0f} (n={len(values)})" if values else "n/a"
        lines.append(f"- `--format {fmt}`: {shown}")
    if rb.BACKGROUND:
        busy = sorted(rb.BACKGROUND)
        lines += ["", f"CPU used by other programs just before each measurement: median"
                      f" {100 * statistics.median(busy):.0f} %, max {100 * busy[-1]:.0f} %."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
