"""The load tool (issue 15): open-loop rate, duration, warmup, latency, CSV, text format."""

import csv
import re
import signal
import time

import pytest
import zmq

from conftest import free_port, wait_until
from helpers import run_cli
from pushpull import latency, wire

SEED_TEXT = re.compile(r"^Pusher-(\d+)\[PID:\d+/TID:\d+\] - Task (\d+)")
FAST_RECEIVER = ("--processing-time", "0", "--quiet")


class TextConsumer:
    """A plain PULL consumer as another project would write one: recv_string() per message."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.port = free_port()
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.messages = []  # (arrival monotonic time, text)

    def receive(self, count, timeout):
        """Receive until `count` messages arrived; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"only {len(self.messages)} of {count} arrived"
            if self.sock.poll(100):
                self.messages.append((time.monotonic(), self.sock.recv_string()))

    def drain(self):
        """Take whatever else is queued, without waiting."""
        while self.sock.poll(0):
            self.messages.append((time.monotonic(), self.sock.recv_string()))

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def consumer():
    sink = TextConsumer()
    yield sink
    sink.close()


def test_text_format_is_read_by_a_plain_text_consumer(procs, consumer):
    """--format text: every frame is the seed's message as UTF-8 plus the trailer; no END frame."""
    sender = procs.sender("--workers", "3", "--messages", "20", "--delay", "0", "--quiet",
                          "--format", "text", endpoints=[consumer.endpoint])
    consumer.receive(60, timeout=20)
    assert sender.wait() == 0, sender.output()[-2000:]
    consumer.drain()  # the sender flushed before it exited: anything more is here now
    texts = [text for _, text in consumer.messages]
    assert len(texts) == 60, texts[60:]
    seen = set()
    for text in texts:
        match = SEED_TEXT.match(text)
        assert match, text
        assert wire.TEXT_PATTERN.match(text), text
        seen.add((int(match[1]), int(match[2])))
    assert seen == {(w, t) for w in (1, 2, 3) for t in range(20)}
    run_id = sender.summary()["run_id"]
    assert all(f"run=" in text and text.split("run=")[1][8:16] == run_id for text in texts)


def test_rate_is_held_open_loop(procs, consumer):
    """--rate 2000 for 2 s: 4000 messages, arriving at 2000 msg/s within a few %."""
    sender = procs.sender("--workers", "4", "--rate", "2000", "--duration", "2", "--quiet",
                          "--format", "text", endpoints=[consumer.endpoint])
    consumer.receive(4000, timeout=30)
    assert sender.wait() == 0, sender.output()[-2000:]
    first, last = consumer.messages[0][0], consumer.messages[-1][0]
    measured = (len(consumer.messages) - 1) / (last - first)
    assert 2000 * 0.95 <= measured <= 2000 * 1.05, measured
    summary = sender.summary()
    assert (summary["planned"], summary["sent"], summary["target_rate_msg_s"]) == \
        (4000, 4000, 2000)
    assert set(summary["send_lag_ms"]) >= {"p99", "max"}


def test_duration_mode_plans_what_the_schedule_holds(procs, consumer):
    """--duration: --rate splits R x D evenly over the workers; --delay D holds ceil(D / delay)."""
    paced = procs.sender("--workers", "3", "--rate", "1000", "--duration", "0.5", "--quiet",
                         "--format", "text", endpoints=[consumer.endpoint], name="paced")
    assert paced.wait() == 0, paced.output()[-2000:]
    assert (paced.summary()["planned"], paced.summary()["sent"]) == (501, 501)  # 3 x 167
    delayed = procs.sender("--workers", "2", "--delay", "0.1", "--duration", "0.45",
                           "--quiet", "--format", "text", endpoints=[consumer.endpoint],
                           name="delayed")
    assert delayed.wait() == 0, delayed.output()[-2000:]
    summary = delayed.summary()
    assert (summary["planned"], summary["sent"]) == (10, 10)  # 0, 0.1, ... 0.4 per worker
    assert summary["config"]["duration"] == 0.45 and summary["config"]["messages"] == 5
    consumer.receive(511, timeout=10)


def test_sender_csv_rows_agree_with_the_summary(procs, consumer, tmp_path):
    """--csv: the issue's columns, one row per stats interval, the last row = the summary;
    unix_time is the wall clock (to join files of several processes on)."""
    path = tmp_path / "sender.csv"
    wall_before = time.time()
    sender = procs.sender("--workers", "2", "--rate", "1000", "--duration", "1", "--quiet",
                          "--format", "text", "--stats-interval", "0.2", "--csv", str(path),
                          endpoints=[consumer.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    wall_after = time.time()
    with open(path, newline="", encoding="utf-8") as src:
        rows = list(csv.reader(src))
    assert rows[0] == ["time_s", "unix_time", "sent", "rate_msg_s", "send_lag_p99_ms",
                       "waiting", "receivers_up"]
    body = rows[1:]
    assert len(body) >= 2
    times = [float(row[0]) for row in body]
    wall = [float(row[1]) for row in body]
    sent = [int(row[2]) for row in body]
    assert times == sorted(times) and sent == sorted(sent)
    assert wall == sorted(wall) and wall_before <= wall[0] and wall[-1] <= wall_after
    summary = sender.summary()
    assert sent[-1] == summary["sent"] == 1000
    assert float(body[-1][4]) == pytest.approx(summary["send_lag_ms"]["p99"], abs=0.002)
    assert body[-1][6] == "1"


def test_json_carries_schema_config_and_versions(procs, consumer):
    """Both summaries start with schema_version, the configuration as run, and versions."""
    sender = procs.sender("--workers", "1", "--messages", "2", "--delay", "0", "--quiet",
                          "--format", "text", endpoints=[consumer.endpoint])
    assert sender.wait() == 0
    summary = sender.summary()
    assert summary["schema_version"] == 2
    assert summary["config"]["workers"] == 1 and summary["config"]["format"] == "text"
    assert "curve_keys" not in summary["config"]
    assert set(summary["versions"]) == {"python", "pyzmq", "libzmq"}
    assert summary["send_lag_ms"] is None  # a flood has no schedule


@pytest.mark.parametrize("args", [
    ("--rate", "100", "--delay", "1"),
    ("--duration", "2", "--messages", "5"),
    ("--duration", "2", "--delay", "0"),
    ("--rate", "0"),
    ("--warmup", "-1"),
    ("--format", "json"),
    ("--format", "text", "--confirm"),
    ("--rate", "1", "--duration", "1", "--workers", "5"),  # under one message per worker
])
def test_bad_load_flags_exit_2_in_one_line(args):
    """Conflicting or impossible schedule flags: exit 2 with a one-line reason."""
    result = run_cli("async-socket-sender.py", *args)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr


def test_histogram_relative_error_and_merge():
    """Percentiles within 1 % of the exact ones over 6 decades; two halves merge to the whole."""
    values = [int(1000 * 1.001 ** i) for i in range(14000)]  # 1 µs .. about 1.2 s
    whole, first, second = latency.Histogram(), latency.Histogram(), latency.Histogram()
    whole.add_batch(0, [-v for v in values])
    first.add_batch(0, [-v for v in values[::2]])
    second.add_batch(0, [-v for v in values[1::2]])
    first.merge(second)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        exact = values[int(fraction * len(values) + 0.999999) - 1]
        assert abs(whole.percentile(fraction) - exact) <= 0.01 * exact
        assert first.percentile(fraction) == whole.percentile(fraction)
    assert whole.max_ns == first.max_ns == values[-1]
    assert whole.summary_ms() == first.summary_ms()


def test_a_stalled_sender_shows_in_latency_ms_not_in_latency_raw_ms(procs):
    """SIGSTOP of a paced sender: its catch-up burst is late by the pause from the intended
    time (latency_ms), but not from the actual send (latency_raw_ms): no coordinated omission."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "2", "--rate", "500", "--duration", "4", "--quiet",
                          "--stats-interval", "0.2", endpoints=[receiver.endpoint])
    sender.wait_for_output(r"\[STATS\] sent [1-9]", timeout=20)
    stopped = time.monotonic()
    sender.signal(signal.SIGSTOP)
    time.sleep(1.5)  # the stall under test, measured below (not assumed)
    sender.signal(signal.SIGCONT)
    pause = time.monotonic() - stopped
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\]", timeout=20)
    assert receiver.stop() == 0
    run = receiver.summary()["runs"][0]
    assert (run["received"], run["complete"]) == (2000, True)
    intended, raw = run["latency_ms"], run["latency_raw_ms"]
    assert intended["max"] >= 0.5 * pause * 1000, (pause, intended)
    assert intended["p99"] >= 0.25 * pause * 1000, (pause, intended)
    assert raw["p99"] * 5 < intended["p99"], (raw, intended)
    lag = sender.summary()["send_lag_ms"]
    assert lag["max"] >= 0.5 * pause * 1000, lag  # the sender knows how late it was


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_warmup_messages_are_counted_but_kept_out_of_latency(procs, fmt):
    """--warmup 0.5 at 1000 msg/s: all 1000 accounted for (either format), 500 in the latency."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "2", "--rate", "1000", "--duration", "1", "--warmup",
                          "0.5", "--quiet", "--format", fmt, endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    line = receiver.wait_for_output(r"\[RUN\]", timeout=20)[0]
    assert "received 1000/1000" in line and "missing 0" in line
    assert receiver.stop() == 0
    summary = receiver.summary()
    run = summary["runs"][0]
    assert (summary["received"], summary["processed"], summary["invalid"]) == (1000, 1000, 0)
    assert (run["received"], run["missing"], run["complete"]) == (1000, 0, True)
    assert run["latency_samples"] == 500  # intended before 0.5 s: 250 per worker
    assert run["run_id"] == sender.summary()["run_id"]


def test_receiver_csv_rows_agree_with_the_summary(procs, tmp_path):
    """Receiver --csv: the issue's columns; the last row = the summary. A flood has
    latency_ms = latency_raw_ms (intended = actual)."""
    path = tmp_path / "receiver.csv"
    wall_before = time.time()
    receiver = procs.receiver(*FAST_RECEIVER, "--stats-interval", "0.2", "--csv", str(path))
    sender = procs.sender("--workers", "2", "--messages", "300", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\]", timeout=20)
    wait_until(lambda: len(path.read_text().splitlines()) >= 3, 10, "two CSV rows")
    assert receiver.stop() == 0
    with open(path, newline="", encoding="utf-8") as src:
        rows = list(csv.reader(src))
    assert rows[0] == ["time_s", "unix_time", "received", "processed", "rate_msg_s", "queue",
                       "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "invalid"]
    summary = receiver.summary()
    last = rows[-1]
    assert (int(last[2]), int(last[3]), int(last[5]), int(last[9])) == \
        (summary["received"], summary["processed"], summary["unprocessed"], summary["invalid"])
    assert [float(v) for v in last[6:9]] == [summary["latency_ms"][k]
                                             for k in ("p50", "p99", "max")]
    times = [float(row[0]) for row in rows[1:]]
    assert times == sorted(times)
    wall = [float(row[1]) for row in rows[1:]]
    assert wall == sorted(wall) and wall_before <= wall[0] and wall[-1] <= time.time()
    run = summary["runs"][0]
    assert run["latency_ms"] == run["latency_raw_ms"] and run["latency_samples"] == 600
    assert summary["schema_version"] == 2 and summary["config"]["csv_path"] == str(path)
    assert set(summary["versions"]) == {"python", "pyzmq", "libzmq"}


def test_receiver_csv_writes_no_rows_while_idle_and_no_lifetime_rate(procs, tmp_path):
    """Between two runs the receiver writes one row at rate 0, then none until the next
    run; the last row's rate is over its own interval (0 when idle), not the lifetime's."""
    path = tmp_path / "receiver.csv"
    receiver = procs.receiver(*FAST_RECEIVER, "--stats-interval", "0.1", "--csv", str(path))

    def rows():
        with open(path, newline="", encoding="utf-8") as src:
            return [[float(v or 0) for v in row] for row in list(csv.reader(src))[1:]]

    def idle_after(processed):
        return any(row[3] == processed and row[4] == 0 for row in rows())

    for run in (1, 2):
        sender = procs.sender("--workers", "1", "--messages", "50", "--delay", "0", "--quiet",
                              endpoints=[receiver.endpoint])
        assert sender.wait() == 0, sender.output()[-2000:]
        wait_until(lambda: idle_after(50 * run), 20, f"an idle row after run {run}")
        if run == 1:
            idle_from = time.time()
            time.sleep(1.0)  # ten stats intervals, idle: nothing may be written
            idle_until = time.time()
    assert receiver.stop() == 0
    body = rows()
    assert not [row for row in body[:-1] if idle_from <= row[1] <= idle_until], body
    # The same counts twice in a row only for the last row (written at the stop).
    values = [row[2:] for row in body]
    assert all(a != b for a, b in zip(values[:-2], values[1:-1])), body
    assert body[-1][4] == 0 and receiver.summary()["processed_per_s"] > 0, body
    assert body[-1][3] == 100
