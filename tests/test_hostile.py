"""Hostile input (issue 13): crafted frames sent over a real socket to the real receiver
cannot crash, hang, bloat or fool it."""

import random
import threading
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import free_port
from helpers import MESSAGE_COLUMN
from pushpull import logs, runs, wire

WORKERS_MAX = 2 ** 32 - 1  # the widest value of a 4-byte header field
RSS_BASE_MB = 60  # docs/hostile-input.md: the receiver's own size, before any message
RSS_TEXT_COPIES = 4  # docs/hostile-input.md: each queued byte counted twice, text copies too


def frame(run_id, workers=1, per_worker=10, worker=1, task=0, kind=wire.DATA, sent_ns=None,
          text=b"x", flags=0, endpoints=1):
    """One frame in the wire format, every header field chosen by the test."""
    sent_ns = time.time_ns() if sent_ns is None else sent_ns
    return wire.HEADER.pack(wire.WIRE_MAGIC, flags, endpoints, workers, per_worker, run_id,
                            kind, 0, worker, task, sent_ns, sent_ns, len(text)) + text


class Pusher:
    """A PUSH socket connected to a receiver: the test's hostile client."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.sndtimeo = 10000  # a receiver that stopped reading fails the test
        self.sock.connect(endpoint)

    def send(self, *frames):
        """Send each frame as one message."""
        for data in frames:
            self.sock.send(data)

    def close(self):
        """Close the socket, letting queued frames leave first."""
        self.sock.close(linger=5000)
        self.ctx.term()


@pytest.fixture
def pusher(procs):
    """A started receiver (quick silent-run reports) and a Pusher connected to it."""
    receiver = procs.receiver("--processing-time", "0", "--run-timeout", "1")
    client = Pusher(receiver.endpoint)
    yield receiver, client
    client.close()


def continuation(proc, line):
    """The continuation lines logged with `line` (its latency, its missing tasks), joined."""
    after = proc.output().split(line + "\n", 1)[1].splitlines()
    lines = []
    for text in after:
        if text[MESSAGE_COLUMN:MESSAGE_COLUMN + len(logs.CONTINUED)] != logs.CONTINUED:
            break
        lines.append(text[MESSAGE_COLUMN:].strip())
    return " ".join(lines)


def peak_rss_mb(pid):
    """The process's peak resident set size (VmHWM), in MB; Linux only."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def rid():
    """A random run id."""
    return random.getrandbits(63)


def test_frames_that_disagree_with_their_runs_first_frame_are_invalid(pusher, procs):
    """The two 41-byte frames of issue 13 (49 bytes in wire format v2: one run id, two
    worker counts), and frames that change messages per worker, flags or endpoints:
    counted invalid; the receiver goes on."""
    receiver, client = pusher
    run_id = rid()
    first = frame(run_id, workers=1, worker=1)
    assert len(first) == wire.HEADER_SIZE + 1
    client.send(first, frame(run_id, workers=5, worker=5), frame(run_id, per_worker=99),
                frame(run_id, flags=wire.FLAG_CONFIRM), frame(run_id, endpoints=2),
                frame(run_id, task=1))  # agrees with the first: recorded
    receiver.wait_for_output(r"\[RUN\] run .*received 2/10")
    sender = procs.sender("--workers", "2", "--messages", "20", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\] run .*received 40/40")
    assert receiver.stop() == 0
    got = receiver.summary()
    assert (got["invalid"], got["processed"]) == (4, 42), got
    assert "run fields differ from its first frame's" in receiver.output()


@pytest.mark.parametrize("workers, per_worker", [
    (1, WORKERS_MAX), (50_000_000, 10), (WORKERS_MAX, WORKERS_MAX)],
    ids=["messages-2**32-1", "workers-50M", "workers-2**32-1"])
def test_a_header_claim_costs_only_what_was_received(pusher, procs, workers, per_worker):
    """One frame claiming billions of tasks: reported at once, missing tasks as ranges,
    memory flat, a valid run processed right after, and a prompt stop."""
    receiver, client = pusher
    run_id = rid()
    client.send(frame(run_id, workers=workers, per_worker=per_worker, worker=workers,
                      task=per_worker - 1))
    line = receiver.wait_for_output(rf"\[RUN\] run {wire.run_label(run_id)}", timeout=15)[0]
    planned = workers * per_worker
    assert f"missing {planned - 1} |" in line, line
    ranges = continuation(receiver, line)
    assert ranges.startswith("rate ") and " missing: Pusher-" in ranges, ranges
    sender = procs.sender("--workers", "1", "--messages", "10", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    if sys.platform.startswith("linux"):
        assert peak_rss_mb(receiver.pid) < RSS_BASE_MB, peak_rss_mb(receiver.pid)
    # A stop that walked the claimed tasks would take minutes; a busy machine, seconds.
    assert receiver.stop(timeout=30) == 0
    (entry,) = [e for e in receiver.summary()["runs"] if e["run_id"] == wire.run_label(run_id)]
    assert entry["missing"] == planned - 1 and entry["received"] == 1
    last_task = f"0-{per_worker - 2}" if per_worker > 2 else "0"
    expected = [f"Pusher-{workers}:{last_task}"] if workers == 1 else \
        [f"Pusher-1..{workers - 1}:0-{per_worker - 1}", f"Pusher-{workers}:{last_task}"]
    assert entry["missing_tasks"] == expected


def test_many_one_frame_runs_keep_memory_shutdown_and_json_bounded(procs):
    """Tens of thousands of one-frame runs: the runs list is capped with a count of those
    left out; past OPEN_RUNS_MAX, idle runs are closed early (with a note) and the rest
    processed untracked, each counted once; memory stays flat."""
    count = 10_000  # ten times OPEN_RUNS_MAX and RUNS_LISTED; a busy machine works them in time
    receiver = procs.receiver("--processing-time", "0", "--quiet", "--no-file-log")
    client = Pusher(receiver.endpoint)
    try:
        client.send(*(frame(rid(), per_worker=2) for _ in range(count)))
    finally:
        client.close()
    receiver.wait_for_output(r"its messages are processed untracked", timeout=40)
    if sys.platform.startswith("linux"):
        assert peak_rss_mb(receiver.pid) < RSS_BASE_MB, peak_rss_mb(receiver.pid)
    assert receiver.stop(timeout=30) == 0  # a warm stop: every message processed first
    got = receiver.summary()
    assert got["processed"] == count
    assert len(got["runs"]) <= runs.RUNS_LISTED
    tracked = sum(entry["received"] for entry in got["runs"]) + got["runs_left_out"]
    assert got["untracked"] == got["untracked_runs"] > 0
    assert tracked + got["untracked"] == count, got
    assert receiver.json_path.stat().st_size < 2_000_000
    # Rate-limited: far fewer lines than runs refused.
    assert len(receiver.lines(r"processed untracked|closed early")) < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS read from /proc")
def test_queue_byte_bound_keeps_rss_within_the_readme_figure(procs):
    """2 workers x 300 kB messages into a slow receiver: its peak RSS stays within the
    docs/hostile-input.md figure for the flags given (the message bound alone would allow 3 GB)."""
    size, per_worker, queue_bytes, hwm = 300_000, 400, 8 * 2 ** 20, 20
    receiver = procs.receiver("--processing-time", "0.001", "--quiet", "--no-file-log",
                              "--queue-bytes", str(queue_bytes), "--hwm", str(hwm))
    sender = procs.sender("--workers", "2", "--messages", str(per_worker), "--delay", "0",
                          "--size", str(size), "--quiet", "--timeout", "20",
                          endpoints=[receiver.endpoint])
    assert sender.wait(60) == 0, sender.output()[-2000:]
    receiver.wait_for_output(rf"\[RUN\] run .*received {2 * per_worker}/", timeout=30)
    peak = peak_rss_mb(receiver.pid)
    assert receiver.stop() == 0
    bound = RSS_BASE_MB + (RSS_TEXT_COPIES * queue_bytes + 2 * hwm * size) / 2 ** 20
    assert peak < bound, (peak, bound)


def test_network_text_is_escaped_in_every_log_line(procs):
    """A newline and ESC in wire-format text and in a plain client's name and text: shown
    escaped, so no forged line reaches server_logs.txt and no ESC the terminal."""
    receiver = procs.receiver("--processing-time", "0")
    forged = "2026-01-01 00:00:00.00 - INFO    - [RUN] run 0badf00d | forged complete"
    client = Pusher(receiver.endpoint)
    try:
        client.send(frame(rid(), per_worker=1, text=f"hi\n{forged}\x1b[2J".encode()),
                    f"plain[x] - Task 7\n{forged}".encode(), "ev\x1bil[x] - Task 8".encode())
        receiver.wait_for_output(r"\[PROC\] .*Task +8")
    finally:
        client.close()
    assert receiver.stop() == 0
    log = (receiver.out_path.parent / "server_logs.txt").read_text(encoding="utf-8")
    assert not [line for line in log.splitlines() if line.startswith(forged[:22])]
    assert "\x1b" not in log and "\x1b" not in receiver.output()
    assert log.count("hi\\n2026-01-01") == 2  # its [MSG] and [PROC] lines
    assert "ZMQ [ev\\x1bil " in log and "Task 7\\n2026" in log
    assert receiver.summary()["processed"] == 3


def test_send_times_out_of_window_are_clock_skew_not_latency(pusher):
    """Send times of -2**63 and 2**63-1: counted clock_skew, run and total; p99 stays sane."""
    receiver, client = pusher
    run_id, now = rid(), time.time_ns()
    client.send(frame(run_id, per_worker=4, task=0, sent_ns=-2 ** 63),
                frame(run_id, per_worker=4, task=1, sent_ns=2 ** 63 - 1),
                frame(run_id, per_worker=4, task=2, sent_ns=now),
                frame(run_id, per_worker=4, task=3, sent_ns=now))
    line = receiver.wait_for_output(r"\[RUN\] run .*received 4/4")[0]
    assert "clock skew 2" in line, line
    assert receiver.stop() == 0
    got = receiver.summary()
    (entry,) = got["runs"]
    assert got["clock_skew"] == entry["clock_skew"] == 2
    assert entry["latency_ms"]["max"] < runs.SENT_TIME_WINDOW * 1000


def test_a_workers_end_counts_once(pusher):
    """A second END frame from a worker does not overwrite sent_reported."""
    receiver, client = pusher
    run_id = rid()
    client.send(frame(run_id, per_worker=2, task=0), frame(run_id, per_worker=2, task=1),
                frame(run_id, per_worker=2, kind=wire.END, task=2, text=b""),
                frame(run_id, per_worker=2, kind=wire.END, task=1, text=b""))
    receiver.wait_for_output(r"second END frame; ignored")
    assert receiver.stop() == 0
    (entry,) = receiver.summary()["runs"]
    assert entry["sent_reported"] == 2 and entry["complete"]


def test_a_run_reported_incomplete_gets_a_second_line_when_it_completes(pusher):
    """Issue 14: data after the [RUN] line (a cut that heals) completes the run: a second
    [RUN] line says so, and runs[] shows the final state."""
    receiver, client = pusher
    run_id = rid()
    label = wire.run_label(run_id)
    client.send(frame(run_id, per_worker=3, task=0))
    first = receiver.wait_for_output(rf"\[RUN\] run {label} \|")[0]
    assert "WARNING" in first and "missing 2 |" in first, first
    assert continuation(receiver, first).endswith("missing: Pusher-1:1-2"), receiver.output()
    client.send(frame(run_id, per_worker=3, task=2), frame(run_id, per_worker=3, task=1))
    second = receiver.wait_for_output(rf"\[RUN\] run {label} \|", count=2)[1]
    assert "received 3/3 | missing 0" in second and "complete after all" in second, second
    client.send(frame(run_id, per_worker=3, task=1))  # the task state was freed: a duplicate
    receiver.wait_for_output(r"\[DUP\]")
    assert receiver.stop() == 0
    (entry,) = receiver.summary()["runs"]
    assert entry["complete"] and entry["missing"] == 0 and entry["missing_tasks"] == []
    assert entry["duplicates"] == 1


class Churn:
    """A thread of the test's hostile client sending one-frame runs, each with a new run
    id, at `per_second` (paced in tenths of a second) until stop()."""

    def __init__(self, endpoint, per_second):
        self.client = Pusher(endpoint)
        self.per_tick = max(1, per_second // 10)
        self.done = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self.thread.start()

    def _run(self):
        next_tick = time.monotonic()
        while not self.done.is_set():
            self.client.send(*(frame(rid(), per_worker=2) for _ in range(self.per_tick)))
            self.sent += self.per_tick
            next_tick += 0.1
            self.done.wait(max(0.0, next_tick - time.monotonic()))

    def stop(self):
        """Stop sending; the frames sent leave before the socket closes."""
        self.done.set()
        self.thread.join(10)
        self.client.close()
        return self.sent


@pytest.mark.parametrize("per_second", [300, 800])
def test_run_churn_cannot_reset_a_live_run(procs, per_second):
    """Issue 19, case 1: new one-frame runs beside a live run, past OPEN_RUNS_MAX: the
    live run is never closed early or counted again from zero; idle churn runs make room,
    and runs beyond what idle ones free are processed untracked, named in the summary."""
    receiver = procs.receiver("--processing-time", "0", "--quiet", "--no-file-log")
    sender = procs.sender("--workers", "2", "--rate", "1000", "--duration", "6", "--quiet",
                          endpoints=[receiver.endpoint])
    start = sender.wait_for_output(r"\[START\] run ", timeout=20)[0]
    label = start.split("[START] run ")[1].split(":")[0]
    churn = Churn(receiver.endpoint, per_second)
    try:
        assert sender.wait(60) == 0, sender.output()[-2000:]
    finally:
        churned = churn.stop()
    assert churned > runs.OPEN_RUNS_MAX, churned  # the bound was passed
    line = receiver.wait_for_output(rf"\[RUN\] run {label} ", timeout=20)[0]
    assert "received 6000/6000 | missing 0" in line, line
    assert receiver.stop() == 0
    got = receiver.summary()
    assert not [e for e in got["runs"] if e["run_id"] == label and not e["complete"]]
    assert got["processed"] == 6000 + churned, got
    assert len(receiver.lines(rf"\[RUN\] run {label} ")) == 1
    if per_second > 500:  # faster than runs go idle: some refused
        assert got["untracked_runs"] > 0 and got["untracked"] == got["untracked_runs"], got
        assert "runs refused a state" in receiver.output()


@pytest.mark.parametrize("workers", [1, WORKERS_MAX], ids=["gaps", "new-workers"])
def test_gaps_cannot_grow_a_runs_task_state(pusher, workers):
    """Issue 19, case 2: one run sending tasks 0, 2, 4, ... (or one task for each of
    millions of workers of a 2**32-1-worker run): its task state stops at
    RANGES_AHEAD_MAX ranges, later tasks are processed and counted untracked with a line
    saying so; memory stays flat, the stop is prompt, the counts add up."""
    receiver, client = pusher
    run_id, count = rid(), 3 * runs.RANGES_AHEAD_MAX
    if workers == 1:
        frames = (frame(run_id, per_worker=WORKERS_MAX, task=2 * i) for i in range(count))
    else:
        frames = (frame(run_id, workers=workers, per_worker=4, worker=1 + 2 * i)
                  for i in range(count))
    client.send(*frames)
    line = receiver.wait_for_output(r"\[RUN\] run .*: over 10000 ranges of tasks out of order;"
                                    r" its tasks beyond a missing one are processed untracked")
    assert "\\n" not in line
    receiver.wait_for_output(r"\[RUN\] run .*untracked", timeout=20)  # silent: reported
    if sys.platform.startswith("linux"):
        assert peak_rss_mb(receiver.pid) < RSS_BASE_MB, peak_rss_mb(receiver.pid)
    started = time.monotonic()
    assert receiver.stop() == 0
    assert time.monotonic() - started < 5
    (entry,) = receiver.summary()["runs"]
    assert entry["received"] + entry["untracked"] == count, entry
    assert entry["untracked"] >= count - runs.RANGES_AHEAD_MAX - 1, entry


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS read from /proc")
def test_a_flood_on_the_confirmation_port_cannot_grow_the_sender(procs):
    """Issue 19, case 3: a peer bound on the sender's confirmation port learns the run's
    topic from the subscription (an XPUB) and floods it with messages just under the
    size limit: the sender's SUB holds at most CHANNEL_RECEIVE_HWM of them."""
    from pushpull import channel, listener
    receiver = procs.receiver("--processing-time", "0", "--quiet", "--no-file-log")
    hostile_port = free_port()
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.sndhwm = 4
    xpub.xpub_nodrop = 1  # a full pipe blocks the flood, paced by what the sender takes
    xpub.sndtimeo = 10000
    xpub.bind(f"tcp://127.0.0.1:{hostile_port}")
    # A busy sender (workers sending, unconfirmed, within a wide window): its listener
    # thread shares the interpreter with them, and falls behind a flood.
    sender = procs.sender("--confirm", "--confirm-port", str(hostile_port), "--workers", "4",
                          "--messages", "500000", "--window", "500000", "--delay", "0",
                          "--quiet", endpoints=[receiver.endpoint])
    try:
        xpub.rcvtimeo = 20000
        subscription = xpub.recv()
        assert subscription[0] == 1 and len(subscription) == 1 + channel.TOPIC_SIZE
        topic = subscription[1:]
        for size in (4 * 2 ** 20 - 200, listener.CHANNEL_MAX_BYTES - 200):  # was the limit; is
            body = b"\x01" + b"\x00" * size
            for _ in range(2 ** 30 // size):  # 1 GB: more than the listener verifies
                try:
                    xpub.send_multipart([topic, body, b"m" * channel.MAC_SIZE], copy=False)
                except zmq.Again:  # the sender takes no more: dropped the connection
                    break
        peak = peak_rss_mb(sender.pid)
        assert sender.popen.poll() is None, sender.output()[-2000:]
        assert peak < 150, peak
    finally:
        xpub.close(linger=0)
        ctx.term()
