#!/usr/bin/env python3
"""Benchmark of the PUSH/PULL pair (issue 5). Run by hand, not part of the test suite:

    python3 bench/run_bench.py            # 3 runs of every figure, about 3-5 minutes
    python3 bench/run_bench.py --runs 5
    python3 bench/run_bench.py --quick    # 1 run with smaller sizes: a smoke test

Prints the machine description and one markdown table (median, min-max over the runs,
target, pass/fail), and writes both to bench/LATEST.md (not with --quick, unless
--output is given). Every process runs on free 127.0.0.1 ports in a temporary
directory, every wait has a timeout, and every child is killed at the end.
Standard library + pyzmq only.
"""

import argparse
import compileall
import hashlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RAW = BENCH / "raw_pushpull.py"
READY_LINE = b"Server is running"
POLL = 0.005  # seconds between two looks at a console file

sys.path.insert(0, str(ROOT))
from pushpull import wire  # noqa: E402  (the wire format's frame size)
from pushpull.cli import free_port  # noqa: E402

FULL = dict(raw_count=2_000_000, quiet_workers=50, quiet_messages=10_000,
            log_workers=20, log_messages=2_000, lat_workers=10, lat_messages=500,
            flood_seconds=8.0)
QUICK = dict(raw_count=500_000, quiet_workers=50, quiet_messages=2_000,
             log_workers=20, log_messages=500, lat_workers=10, lat_messages=200,
             flood_seconds=4.0)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------
class BenchError(Exception):
    """A scenario could not be measured (timeout, early exit, wrong counts)."""


class Proc:
    """A child process with its console (stdout + stderr) in a file that can be tailed."""

    live = []  # every Proc not yet reaped: killed by kill_all()

    def __init__(self, args, workdir, name):
        self.name = name
        self.out_path = Path(workdir) / f"{name}.out"
        self.json_path = Path(workdir) / f"{name}.json"
        with open(self.out_path, "wb") as out:
            self.popen = subprocess.Popen([sys.executable, *map(str, args)], cwd=workdir,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        self.started = time.time()
        self._tail = open(self.out_path, "rb")
        self._rest = b""
        Proc.live.append(self)

    @property
    def pid(self):
        return self.popen.pid

    def wait_for(self, pattern, timeout, what=None):
        """Wait until a new console line contains `pattern` (bytes); returns (time, line)."""
        deadline = time.monotonic() + timeout
        while True:
            chunk = self._tail.read()
            if chunk:
                data = self._rest + chunk
                cut = data.rfind(b"\n") + 1
                lines, self._rest = data[:cut], data[cut:]
                if pattern in lines:
                    seen = time.time()
                    start = lines.find(pattern)
                    line = lines[lines.rfind(b"\n", 0, start) + 1:lines.find(b"\n", start)]
                    return seen, line.decode("utf-8", "replace")
            elif self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.popen.returncode}) before"
                                 f" printing {what or pattern!r}: {self.last_lines()}")
            if time.monotonic() >= deadline:
                raise BenchError(f"{self.name}: no {what or pattern!r} within {timeout:g} s:"
                                 f" {self.last_lines()}")
            time.sleep(POLL)

    def last_lines(self, n=3):
        try:
            text = self.out_path.read_bytes()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-n:])

    def signal(self, sig):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout):
        """Wait for exit; returns the exit status, or raises BenchError."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} still running {timeout:g} s after it was asked"
                             f" to stop: {self.last_lines()}") from None

    def stop(self, timeout=15):
        """Ctrl+C, then wait for the exit."""
        self.signal(signal.SIGINT)
        return self.wait(timeout)

    def summary(self):
        try:
            return json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BenchError(f"{self.name}: no JSON summary ({exc})") from None

    def kill(self):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGCONT)
                self.popen.kill()
            except OSError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._tail.close()
        if self in Proc.live:
            Proc.live.remove(self)


# The code a benchmark runs: the two scripts and the package (pushpull.py before it).
SCRIPTS = ("async-socket-receiver.py", "async-socket-sender.py")
CODE = (*SCRIPTS, "pushpull", "pushpull.py")


@dataclass(frozen=True)
class Scripts:
    """The copies of the scripts a benchmark runs, and what code they are."""

    receiver: Path
    sender: Path
    description: str


def code_files(root):
    """The files of CODE under `root`, relative to it, in a fixed order."""
    files = []
    for name in CODE:
        path = Path(root) / name
        if path.is_dir():
            files += sorted(p.relative_to(root) for p in path.rglob("*.py"))
        elif path.is_file():
            files.append(Path(name))
    return files


def compile_package(dest):
    """Write the bytecode of the copied package, as a user's first run leaves it.

    Without it every start of a copy compiles each module again (25 ms and more of the
    sender's start, inside every end-to-end figure) where a user's checkout has its
    __pycache__ after the first run; PYTHONDONTWRITEBYTECODE, set on some machines,
    would keep it so. py_compile writes the files whatever that variable says. The
    scripts themselves are compiled at every start, as they are for a user.
    """
    compileall.compile_dir(str(Path(dest) / "pushpull"), quiet=1)


def snapshot(dest):
    """Copy the scripts and the package into `dest`, to run them from there: the working
    tree may change while the bench runs."""
    dest = Path(dest)
    digest = hashlib.sha1()
    for name in code_files(ROOT):
        data = (ROOT / name).read_bytes()
        digest.update(data)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *CODE], cwd=ROOT,
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        head, dirty = "?", False
    compile_package(dest)
    return Scripts(dest / SCRIPTS[0], dest / SCRIPTS[1],
                   f"commit {head}{' + uncommitted changes' if dirty else ''}"
                   f" (sha1 of the code {digest.hexdigest()[:10]})")


def kill_all():
    for proc in list(Proc.live):
        proc.kill()


class Pair:
    """A receiver (started and ready on enter) and its senders, all killed on exit."""

    def __init__(self, workdir, scripts, *receiver_args, json=True):
        self.workdir = Path(workdir)
        self.scripts = scripts
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.receiver_args = [*receiver_args,
                              "--port", self.port, "--bind", "127.0.0.1",
                              "--spill-file", self.workdir / "spill.bin"]
        if json:
            self.receiver_args += ["--json", self.workdir / "receiver.json"]
        self.procs = []
        self.receiver = None

    def __enter__(self):
        self.receiver = Proc([self.scripts.receiver, *self.receiver_args], self.workdir, "receiver")
        self.procs.append(self.receiver)
        self.receiver.wait_for(READY_LINE, 15, "ready line")
        return self

    def sender(self, *args, name="sender"):
        proc = Proc([self.scripts.sender, "--connect", self.endpoint, *args], self.workdir, name)
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()


# ---------------------------------------------------------------------------
# The scenarios: each returns {figure key: value}
# ---------------------------------------------------------------------------
def frame_size():
    """Bytes of a typical frame of the pair: header + 'Pusher-17[PID:.../TID:...] - Task 5000'."""
    run = wire.RunInfo(1 << 62, 50, 10_000, 1)
    encoder = wire.MessageEncoder(run, 17, 12345, 140_000_000_000_000)  # typical widths
    return len(encoder.data(5000))


def run_raw(tmp, pull_args, push_args, result_key, timeout):
    """Run raw_pushpull.py's pull side, then its push side; the pull side's JSON result."""
    pull = Proc([RAW, *pull_args], tmp, f"raw-{pull_args[0]}")
    try:
        pull.wait_for(b"READY", 10)
        push = Proc([RAW, *push_args], tmp, f"raw-{push_args[0]}")
        try:
            _, line = pull.wait_for(result_key, timeout, "raw result")
            push.wait(30)
        finally:
            push.kill()
    finally:
        pull.kill()
    result = json.loads(line)
    if "error" in result:
        raise BenchError(result["error"])
    return result


def bench_raw(tmp, sizes, size):
    """(1): plain pyzmq PUSH->PULL between two processes, the pair's frame size."""
    port, count = free_port(), sizes["raw_count"]
    result = run_raw(tmp, ["pull", port, count], ["push", port, count, size],
                     b"msg_per_s", 120)
    return {"raw": result["msg_per_s"]}


def bench_raw_latency(tmp, sizes, size):
    """The floor for (4): plain pyzmq threads with the pair's pattern and frame size."""
    port = free_port()
    workers, messages = sizes["lat_workers"], sizes["lat_messages"]
    result = run_raw(tmp, ["lat-pull", port, workers * messages],
                     ["lat-push", port, workers, messages, "0.01", size], b"p99_ms", 60)
    return {"raw_p99": result["p99_ms"], "raw_max": result["max_ms"]}


def end_to_end(pair, planned, sender_args, timeout):
    """Start a sender, wait for the receiver's [RUN] line: (msg/s, stamped msg/s, summary)."""
    started = time.time()
    sender = pair.sender(*sender_args)
    seen, line = pair.receiver.wait_for(b"[RUN]", timeout, "[RUN] line")
    stamped = log_time(line)
    sender.wait(30)
    pair.receiver.stop(30)
    run = runs0(pair.receiver.summary())
    if run["received"] != planned or not run["complete"]:
        raise BenchError(f"run incomplete: received {run['received']} of {planned}")
    stamped_rate = planned / (stamped - started) if stamped and stamped > started else None
    return planned / (seen - started), stamped_rate


def cpu_seconds(pid):
    """User + system CPU seconds a live process has used so far, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reap_cpu_seconds(proc, timeout):
    """Wait for `proc` to exit (at most `timeout` s); the user + system CPU seconds it used."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            raise BenchError(f"{proc.name} still running {timeout:g} s after the run")
        time.sleep(POLL)


def log_time(line):
    """The wall-clock time in a log line's '2026-11-23 15:08:22.15' stamp (end of its 10 ms)."""
    match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d\d)", line)
    if not match:
        return None
    return time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 100 + 0.01


def runs0(summary):
    if not summary.get("runs"):
        raise BenchError("receiver summary has no run")
    return summary["runs"][0]


def bench_quiet(tmp, scripts, sizes, raw, fmt="binary"):
    workers, messages = sizes["quiet_workers"], sizes["quiet_messages"]
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log") as pair:
        rate, stamped = end_to_end(pair, workers * messages,
                                   ["--workers", workers, "--messages", messages,
                                    "--delay", "0", "--quiet", "--format", fmt], 180)
    if fmt != "binary":
        return {f"quiet_{fmt}": rate, f"quiet_{fmt}_ratio": rate / raw if raw else None}
    out = {"quiet": rate, "quiet_ratio": rate / raw if raw else None}
    if stamped:
        out["quiet_stamped"] = stamped
    return out


def bench_confirm(tmp, scripts, sizes, quiet):
    """(2c) the quiet pair again, with --confirm: the cost of confirmed delivery."""
    workers, messages = sizes["quiet_workers"], sizes["quiet_messages"]
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log") as pair:
        rate, _ = end_to_end(pair, workers * messages,
                             ["--workers", workers, "--messages", messages,
                              "--delay", "0", "--quiet", "--confirm"], 180)
    return {"confirm": rate, "confirm_ratio": rate / quiet if quiet else None}


def bench_logging(tmp, scripts, sizes):
    workers, messages = sizes["log_workers"], sizes["log_messages"]
    with Pair(tmp, scripts, "--processing-time", "0", "--log-file", Path(tmp) / "server_logs.txt") as pair:
        rate, stamped = end_to_end(pair, workers * messages,
                                   ["--workers", workers, "--messages", messages,
                                    "--delay", "0"], 180)
    out = {"logging": rate}
    if stamped:
        out["logging_stamped"] = stamped
    return out


def bench_latency(tmp, scripts, sizes):
    workers, messages = sizes["lat_workers"], sizes["lat_messages"]
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log") as pair:
        sender = pair.sender("--workers", workers, "--messages", messages, "--delay", "0.01",
                             "--quiet")
        pair.receiver.wait_for(b"[RUN]", 60, "[RUN] line")
        sender.wait(30)
        pair.receiver.stop(30)
        run = runs0(pair.receiver.summary())
    if run["received"] != workers * messages:
        raise BenchError(f"latency run incomplete: {run['received']} of {workers * messages}")
    lat = run["latency_ms"]
    return {"p50": lat["p50"], "p99": lat["p99"], "max": lat["max"]}


def proc_status(pid):
    """VmRSS and VmHWM of a process in MB."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024
    return values


def bench_memory(tmp, scripts, sizes):
    seconds = sizes["flood_seconds"]
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0.1", "--log-file",
              Path(tmp) / "server_logs.txt") as pair:
        pid = pair.receiver.pid
        sender = pair.sender("--workers", "50", "--messages", "1000000", "--delay", "0",
                             "--quiet")
        started = time.monotonic()
        samples = []
        while (now := time.monotonic() - started) < seconds:
            samples.append((now, proc_status(pid)["VmRSS"]))
            time.sleep(0.1)
        final = proc_status(pid)
        samples.append((time.monotonic() - started, final["VmRSS"]))
        if sender.popen.poll() is not None:
            raise BenchError(f"flood sender exited early: {sender.last_lines()}")
        # Not an empty-queue stop: workers blocked by backpressure, a flush toward a
        # full receiver (up to SERVER_TIMEOUT). Reported for information.
        sender_hwm = 0.0
        stop_started = time.monotonic()
        sender.signal(signal.SIGINT)
        deadline = stop_started + 20
        while sender.popen.poll() is None and time.monotonic() < deadline:
            try:
                sender_hwm = max(sender_hwm, proc_status(sender.pid)["VmHWM"])
            except (OSError, KeyError):
                break  # exited between the poll and the read
            time.sleep(0.05)
        try:
            sender.popen.wait(max(0.0, deadline - time.monotonic()))
            sender_stop = time.monotonic() - stop_started
        except subprocess.TimeoutExpired:
            sender_stop = None
    at_two = next(rss for t, rss in samples if t >= min(2.0, seconds / 2))
    last = samples[-1][1]
    growth = last - at_two
    return {"rss_peak": final["VmHWM"], "rss_growth": growth,
            "rss_flat": growth <= max(5.0, 0.1 * at_two),
            "flood_sender_stop": sender_stop, "flood_sender_rss": sender_hwm or None}


def bench_detection(tmp, scripts, how):
    """Seconds from kill -9 / SIGSTOP of the receiver to the sender's [HEARTBEAT] down line."""
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log", json=False) as pair:
        sender = pair.sender("--delay", "0.01", "--quiet", "--messages", "100000")
        sender.wait_for(b" up: connected", 10, "[HEARTBEAT] up line")
        time.sleep(1.0)
        started = time.time()
        pair.receiver.signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        seen, _ = sender.wait_for(b" down: ", 15, "[HEARTBEAT] down line")
        pair.receiver.signal(signal.SIGCONT)
    return {f"detect_{how}": seen - started}


def bench_shutdown(tmp, scripts):
    """Seconds from SIGINT to exit, sender first (receiver keeping up), then the receiver."""
    with Pair(tmp, scripts, "--quiet", "--processing-time", "0", "--no-file-log", json=False) as pair:
        sender = pair.sender("--delay", "0.01", "--quiet", "--messages", "100000")
        sender.wait_for(b" up: connected", 10, "[HEARTBEAT] up line")
        time.sleep(1.0)
        started = time.monotonic()
        sender.stop(15)
        sender_s = time.monotonic() - started
        time.sleep(0.5)
        started = time.monotonic()
        pair.receiver.stop(15)
        receiver_s = time.monotonic() - started
    return {"shutdown_sender": sender_s, "shutdown_receiver": receiver_s}


def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy over `seconds` (other programs: this script is asleep)."""
    def sample():
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


BACKGROUND = []  # CPU busy fraction seen just before each scenario


def wait_for_quiet(limit, log):
    """Wait (at most `limit` s) until other programs leave the CPUs mostly idle."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > 0.10 and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    if busy > 0.10:
        log(f"  (machine busy: {100 * busy:.0f} % CPU used by other programs)")
    BACKGROUND.append(busy)


def one_run(scripts, sizes, size, log, idle_wait):
    """Every scenario once; returns {figure key: value} and a list of problems."""
    values, problems = {}, []

    def step(name, func, *args):
        wait_for_quiet(idle_wait, log)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            t0 = time.monotonic()
            try:
                values.update(func(tmp, *args))
            except BenchError as exc:
                problems.append(f"{name}: {exc}")
            finally:
                kill_all()
            log(f"  {name:<16} {time.monotonic() - t0:5.1f} s")

    step("raw", bench_raw, sizes, size)
    step("quiet", bench_quiet, scripts, sizes, values.get("raw"))
    step("quiet-text", bench_quiet, scripts, sizes, values.get("quiet"), "text")
    step("confirm", bench_confirm, scripts, sizes, values.get("quiet"))
    step("logging", bench_logging, scripts, sizes)
    step("latency", bench_latency, scripts, sizes)
    step("raw-latency", bench_raw_latency, sizes, size)
    step("memory", bench_memory, scripts, sizes)
    step("detect-kill", bench_detection, scripts, "kill")
    step("detect-stop", bench_detection, scripts, "stop")
    step("shutdown", bench_shutdown, scripts)
    return values, problems


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def rate_text(v):
    return f"{v:,.0f}"


def secs(v):
    return f"{v:.2f}"


def ms(v):
    return f"{v:.3f}"


def mb(v):
    return f"{v:.1f}"


def ratio(v):
    return f"{v:.2f}×"


# key, figure, unit, format, target text, pass test (None: for information)
ROWS = [
    ("raw", "(1) limit: raw pyzmq PUSH→PULL, {size} B frames", "msg/s", rate_text,
     "info (issue: ~1.0–1.2 M at 52 B)", None),
    ("quiet", "(2) pair, quiet, 50×{quiet_messages}, end to end", "msg/s", rate_text,
     "", None),
    ("quiet_ratio", "(2) … ratio to (1), same run", "", ratio,
     "≥ 0.40× (stretch 0.5×, issue 22)", lambda v: v >= 0.40),
    ("quiet_text", "(2t) pair, quiet, --format text, 50×{quiet_messages}, end to end",
     "msg/s", rate_text, "", None),
    ("quiet_text_ratio", "(2t) … ratio to (2), same run", "", ratio, "info", None),
    ("confirm", "(2c) pair, quiet, --confirm, 50×{quiet_messages}, end to end", "msg/s",
     rate_text, "", None),
    ("confirm_ratio", "(2c) … ratio to (2), same run", "", ratio, "≥ 0.60× (issue 22)",
     lambda v: v >= 0.60),
    ("logging", "(3) pair, both log lines per message, 20×{log_messages}", "msg/s", rate_text,
     "≥ 25,000", lambda v: v >= 25_000),
    ("p50", "(4) latency p50 at ~1,000 msg/s", "ms", ms, "info", None),
    ("p99", "(4) latency p99", "ms", ms, "≤ 1 ms", lambda v: v <= 1.0),
    ("max", "(4) latency max", "ms", ms, "info", None),
    ("raw_p99", "(4) floor: raw pyzmq, same threads/pace/size, p99", "ms", ms, "info", None),
    ("raw_max", "(4) floor: raw pyzmq, same threads/pace/size, max", "ms", ms, "info", None),
    ("rss_peak", "(5) receiver peak RSS, flood, --processing-time 0.1", "MB", mb, "≤ 100 MB",
     lambda v: v <= 100),
    ("rss_growth", "(5) … RSS growth, last sample − sample at 2 s", "MB", mb,
     "flat (≤ max(5 MB, 10 %))", "flat"),
    ("detect_kill", "(6) failure detection after kill -9", "s", secs, "≤ 3.0 s",
     lambda v: v <= 3.0),
    ("detect_stop", "(6) failure detection after SIGSTOP", "s", secs, "≤ 3.0 s",
     lambda v: v <= 3.0),
    ("shutdown_receiver", "(7) receiver shutdown on Ctrl+C, empty queue", "s", secs, "≤ 1 s",
     lambda v: v <= 1.0),
    ("shutdown_sender", "(7) sender shutdown on Ctrl+C, empty queue", "s", secs, "≤ 1 s",
     lambda v: v <= 1.0),
    ("flood_sender_stop", "(7′) sender stop on Ctrl+C under the flood of (5)", "s", secs,
     "info (backpressure, not an empty queue)", None),
    ("flood_sender_rss", "(5′) sender peak RSS in the flood of (5), incl. its stop", "MB", mb,
     "info", None),
]


def table(runs, sizes, size):
    lines = ["| figure | median | min–max | unit | target | result |",
             "|---|---:|---:|---|---|---|"]
    for key, label, unit, fmt, target, test in ROWS:
        label = label.format(size=size, **sizes)
        values = [run[key] for run in runs if run.get(key) is not None]
        if not values:
            lines.append(f"| {label} | n/a | | {unit} | {target} | NOT MEASURED |")
            continue
        median = statistics.median(values)
        spread = f"{fmt(min(values))}–{fmt(max(values))}" if len(values) > 1 else ""
        if test is None:
            verdict = "—"
        elif test == "flat":
            flags = [run["rss_flat"] for run in runs if "rss_flat" in run]
            verdict = "pass" if all(flags) else f"FAIL ({flags.count(False)}/{len(flags)} runs grew)"
        else:
            ok = test(median)
            misses = sum(1 for v in values if not test(v))
            verdict = "pass" if ok else "FAIL"
            if ok and misses:
                verdict += f" ({misses}/{len(values)} runs missed)"
        count = f" (n={len(values)})" if len(values) != len(runs) else ""
        lines.append(f"| {label} | {fmt(median)}{count} | {spread} | {unit} | {target}"
                     f" | {verdict} |")
    return "\n".join(lines)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()},"
            f" Python {platform.python_version()}, pyzmq {zmq.__version__},"
            f" libzmq {zmq.zmq_version()} (load average at start: {load})")


def log(text):
    """A progress line, on stderr: stdout holds the report alone."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of every scenario (default 3)")
    p.add_argument("--quick", action="store_true", help="1 run, smaller sizes: a smoke test")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file to write (default bench/LATEST.md; none with --quick)")
    p.add_argument("--idle-wait", type=float, default=10.0, metavar="SECONDS",
                   help="before each scenario, wait up to this long for other programs to"
                        " leave the CPUs idle (default 10)")
    return p.parse_args(argv)


def run_all(runs, sizes, size, idle_wait):
    """Every scenario `runs` times, on a snapshot of the code; returns the values of each
    run, the problems met, and the code's description. Ctrl+C keeps the runs done."""
    results, problems = [], []
    code_dir = tempfile.TemporaryDirectory(prefix="bench-code-")
    scripts = snapshot(code_dir.name)
    log(f"Code: {scripts.description}")
    try:
        for number in range(1, runs + 1):
            log(f"run {number}/{runs}")
            values, found = one_run(scripts, sizes, size, log, idle_wait)
            results.append(values)
            problems += [f"run {number}: {text}" for text in found]
    except KeyboardInterrupt:
        log("interrupted: reporting the runs completed so far")
    finally:
        kill_all()
        code_dir.cleanup()
    return results, problems, scripts.description


def notes(results, size, quick, total, when):
    """The lines under the table: how each figure was taken, and how busy the machine was."""
    lines = [f"Frame size {size} B: wire.HEADER_SIZE {wire.HEADER_SIZE} + a typical"
             f" text of {size - wire.HEADER_SIZE} B; (1) sends frames of the same size.",
             f"{len(results)} run(s){' (--quick: reduced sizes)' if quick else ''},"
             f" {total:.0f} s in all, {when}.",
             "End-to-end rates (2) and (3): from just before the sender process is started"
             " (its start-up included) until the receiver's [RUN] line, printed when the"
             " run's last message is processed, appears on its console.",
             "Latency (4): the receiver's own histogram (receive time of the batch minus"
             " the sender's timestamp), from its --json summary."]
    stamped = [(k, [r[k] for r in results if r.get(k)])
               for k in ("quiet_stamped", "logging_stamped")]
    for key, values in stamped:
        if values:
            lines.append(f"{key.split('_')[0]}: by the [RUN] line's own time stamp (when the"
                         f" last message was processed, before its log line was written)"
                         f" median {statistics.median(values):,.0f} msg/s.")
    if BACKGROUND:
        busy = sorted(BACKGROUND)
        lines.append(f"CPU used by other programs just before each scenario: median"
                     f" {100 * statistics.median(busy):.0f} %, max {100 * busy[-1]:.0f} %"
                     f" ({sum(1 for b in busy if b > 0.10)} of {len(busy)} scenarios started"
                     f" above 10 %); load average at the end:"
                     f" {' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    return lines


def main(argv=None):
    a = parse_args(argv)
    sizes = QUICK if a.quick else FULL
    runs = 1 if a.quick else max(1, a.runs)
    output = a.output or (None if a.quick else BENCH / "LATEST.md")
    size = frame_size()
    started = time.monotonic()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    description = machine()
    log(f"Machine: {description}")
    results, problems, code = run_all(runs, sizes, size, a.idle_wait)
    body = table(results, sizes, size)
    listed = notes(results, size, a.quick, time.monotonic() - started, when) + problems
    text = (f"Machine: {description}\nCode: {code}\n\n{body}\n\n"
            + "\n".join(f"- {note}" for note in listed) + "\n")
    print()
    print(text)
    if output:
        output.write_text(f"# Benchmark: latest run\n\n`python3 bench/run_bench.py"
                          f"{' --runs ' + str(runs) if runs != 3 else ''}`\n\n{text}",
                          encoding="utf-8")
        log(f"written to {output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
