#!/usr/bin/env python3
"""Profile one side of the pair with py-spy (pip install py-spy), run by hand:

    python3 bench/profile_pair.py quiet receiver     # (2)'s load, py-spy on the receiver
    python3 bench/profile_pair.py logging sender     # (3)'s load, py-spy on the sender
    python3 bench/profile_pair.py paced receiver --gil   # (2) paced at --rate; GIL holder only
    python3 bench/profile_pair.py confirm sender --gil   # (2c): --confirm

Prints, per thread, the functions with the most samples: self % (the function itself)
and total % (with what it calls), as shares of that thread's non-idle samples.
Keeps the raw collapsed stacks (and an SVG flame graph with --svg) in bench/results/.
"""

import argparse
import collections
import linecache
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import run_bench as rb  # noqa: E402

LOADS = {
    # receiver args, sender args
    "quiet": (["--quiet", "--processing-time", "0", "--no-file-log"],
              ["--workers", "50", "--messages", "40000", "--delay", "0", "--quiet"]),
    "logging": (["--processing-time", "0", "--log-file", "{tmp}/server_logs.txt"],
                ["--workers", "20", "--messages", "10000", "--delay", "0"]),
    "confirm": (["--quiet", "--processing-time", "0", "--no-file-log"],
                ["--workers", "50", "--messages", "20000", "--delay", "0", "--quiet",
                 "--confirm"]),
    # (2)'s sender paced at --rate (default PACED_RATE) for 10 s: no backlog
    "paced": (["--quiet", "--processing-time", "0", "--no-file-log"],
              ["--workers", "50", "--messages", "{messages}", "--rate", "{rate}", "--quiet"]),
}
PACED_RATE = 240_000  # msg/s: about 80 % of the quiet flood's rate on the machine of issue 22
PACED_SECONDS = 10  # seconds of schedule of the paced load


def short(frame, line=False):
    """'func (file:line)' -> 'func (file)' or 'func (file:line)', the file without its path."""
    if " (" not in frame:
        return frame
    func, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit("/", 1)[-1]
    return f"{func} ({where if line else where.split(':')[0]})"


def source(where, raw):
    """The text of a 'func (file.py:123)' line, from the snapshot next to the raw stacks."""
    match = re.search(r"\((\S+\.py):(\d+)\)$", where)
    if not match:
        return ""
    path = Path(raw).parent / "src" / match[1]
    return linecache.getline(str(path), int(match[2])).strip()[:70] if path.exists() else ""


def top(raw_path, limit):
    """{thread: (samples, [(function, self, total)], [(line, self)])} from collapsed stacks."""
    threads = collections.defaultdict(
        lambda: [0, collections.Counter(), collections.Counter(), collections.Counter()])
    for line in Path(raw_path).read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        frames = stack.split(";")
        thread = re.sub(r"-\d+$", "-*", frames[0].split(": ", 1)[-1])
        entry = threads[thread]
        entry[0] += count
        if len(frames) > 1:
            entry[1][short(frames[-1])] += count
            entry[3][short(frames[-1], line=True)] += count
            for func in {short(f) for f in frames[1:]}:
                entry[2][func] += count
    result = {}
    for thread, (samples, own, total, lines) in threads.items():
        rows = sorted(own, key=lambda f: -own[f])[:limit]
        result[thread] = (samples, [(f, own[f], total[f]) for f in rows],
                          lines.most_common(limit))
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("load", choices=sorted(LOADS))
    p.add_argument("side", choices=["receiver", "sender"])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--svg", action="store_true")
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    p.add_argument("--gil", action="store_true",
                   help="py-spy --gil: only the thread holding the GIL, so threads waiting"
                        " for a lock or the GIL count as idle (the Python CPU of the process)")
    p.add_argument("--raw-only", metavar="FILE", help="only summarise an existing raw file")
    p.add_argument("--revision", metavar="REV",
                   help="profile the code of a git revision instead of the working tree")
    p.add_argument("--rate", type=int, default=PACED_RATE,
                   help=f"msg/s of the paced load (default {PACED_RATE:,})")
    a = p.parse_args()
    if a.raw_only:
        return report(Path(a.raw_only), a)
    out_dir = rb.BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    src = out_dir / "src"  # kept: the raw stacks' line numbers refer to it
    shutil.rmtree(src, ignore_errors=True)
    scripts = compare.scripts_at(a.revision, src) if a.revision else rb.snapshot(src)
    print("code:", scripts.description)
    raw = out_dir / (f"profile-{a.load}-{a.side}{'-gil' if a.gil else ''}"
                     f"{'-' + a.revision if a.revision else ''}.txt")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        receiver_args, sender_args = LOADS[a.load]
        receiver_args = [arg.format(tmp=tmp) for arg in receiver_args]
        sender_args = [arg.format(rate=a.rate, messages=a.rate * PACED_SECONDS // 50)
                       for arg in sender_args]
        spy = None
        try:
            with rb.Pair(tmp, scripts, *receiver_args) as pair:
                started = time.time()
                sender = pair.sender(*sender_args)
                target = pair.receiver if a.side == "receiver" else sender
                time.sleep(0.3)  # past start-up: profile the steady state
                cmd = ["py-spy", "record", "--pid", str(target.pid), "--rate", "200",
                       "--threads", *(["--native"] if a.native else ["--nonblocking"]),
                       *(["--gil"] if a.gil else []),
                       "--duration", str(int(a.seconds)), "--format", "raw", "-o", str(raw)]
                spy = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 30)
                if a.svg:
                    print("(svg: run py-spy with --format flamegraph yourself)")
                try:
                    seen, _ = pair.receiver.wait_for(b"[RUN]", 120, "[RUN] line")
                    planned = int(sender_args[1]) * int(sender_args[3])
                    print(f"run end to end: {planned / (seen - started):,.0f} msg/s"
                          f" (with py-spy attached)")
                except rb.BenchError as exc:
                    print(f"no [RUN] line: {exc}")
        finally:
            rb.kill_all()
    if spy is None or spy.returncode != 0 or not raw.exists():
        print(spy.stderr if spy else "py-spy did not run", file=sys.stderr)
        return 1
    return report(raw, a)


def report(raw, a):
    rate = 200
    for thread, (samples, rows, lines) in sorted(top(raw, a.top).items(),
                                                 key=lambda kv: -kv[1][0]):
        print(f"\n== thread {thread}: {samples} non-idle samples"
              f" (~{100 * samples / (rate * int(a.seconds)):.0f} % of one core) ==")
        print(f"  {'self %':>6} {'total %':>7}  function (self: in the function itself,"
              " with the C calls it makes)")
        for func, own, total in rows:
            print(f"  {100 * own / samples:6.1f} {100 * total / samples:7.1f}  {func}")
        print("  self % by line:")
        for where, own in lines:
            print(f"  {100 * own / samples:6.1f}          {where}  {source(where, raw)}")
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
