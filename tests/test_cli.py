"""Command line (--help, bad values) and the shared module's units: wire format, histogram, queue."""

import queue
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, load_script, wait_until
from helpers import help_blocks, run_cli

RECEIVER = load_script("async-socket-receiver")
SENDER = load_script("async-socket-sender")
from pushpull import cli, latency, receiveflow, runs, sendflow, wire  # noqa: E402  (load_script put the root on sys.path)

# Flag -> default shown by --help. Seed values where issue 3 fixes them, else the constant.
RECEIVER_DEFAULTS = {
    "--port": "5560",
    "--bind": "*",
    "--processing-time": "0.1",
    "--queue-size": str(RECEIVER.QUEUE_MAXSIZE),
    "--log-file": "server_logs.txt",
    "--no-file-log": "False",
    "--quiet": "False",
    "--stats-interval": str(RECEIVER.STATS_INTERVAL),
    "--json": None,  # None: no "(default: None)"
}
SENDER_DEFAULTS = {
    "--workers": "20",
    "--messages": "10",
    "--delay": "0.5",
    "--connect": "tcp://localhost:5560",
    "--timeout": "3.0",
    "--retries": "2",
    "--heartbeat-interval": "2.0",
    "--log-file": None,
    "--quiet": "False",
    "--json": None,
    "--size": str(SENDER.MESSAGE_SIZE),
}


@pytest.mark.parametrize("script,defaults", [
    ("async-socket-receiver.py", RECEIVER_DEFAULTS),
    ("async-socket-sender.py", SENDER_DEFAULTS),
])
def test_help_lists_every_issue_flag_with_its_default(script, defaults):
    """--help exits 0 and shows each flag issue 3 names, with its one, correct default."""
    result = run_cli(script, "--help")
    assert result.returncode == 0, result.stderr
    blocks = help_blocks(result.stdout)
    for flag, default in defaults.items():
        assert flag in blocks, f"{script} --help does not list {flag}"
        shown = re.findall(r"\(?default:? ([^()\s]+)\)", blocks[flag])
        expected = [] if default is None else [default]
        assert shown == expected, f"{script} {flag}: help shows defaults {shown}," \
                                  f" expected only {default!r}: {blocks[flag]}"


@pytest.mark.parametrize("script,groups", [
    ("async-socket-receiver.py", ["sockets", "load", "delivery", "security", "output"]),
    ("async-socket-sender.py", ["load", "receivers", "delivery", "security", "output"]),
])
def test_help_is_in_groups_without_default_none(script, groups):
    """--help lists the flags under their groups' headings, in order; never
    "(default: None)"; --confirm-port's default (the port + 1) said once."""
    text = run_cli(script, "--help").stdout
    headings = re.findall(r"^(\w[\w ]*):$", text, re.MULTILINE)
    assert headings == ["options", *groups], headings
    assert "default: None" not in text
    confirm_port = help_blocks(text)["--confirm-port"]
    assert confirm_port.count("default") == 1 and "+ 1" in confirm_port, confirm_port


@pytest.mark.parametrize("script,args,flag", [
    ("async-socket-sender.py", ["--workers", "0"], "--workers"),
    ("async-socket-sender.py", ["--delay", "-1"], "--delay"),
    ("async-socket-sender.py", ["--messages", "-3"], "--messages"),
    ("async-socket-sender.py", ["--timeout", "0"], "--timeout"),
    ("async-socket-sender.py", ["--size", "-5"], "--size"),
    ("async-socket-sender.py", ["--connect", "localhost:5560"], "--connect"),
    ("async-socket-sender.py", ["--bogus"], "--bogus"),
    ("async-socket-sender.py", ["--csv", "/no-such-directory/rows.csv"], "--csv"),
    ("async-socket-receiver.py", ["--csv", "/no-such-directory/rows.csv"], "--csv"),
    ("async-socket-receiver.py", ["--port", "0"], "--port"),
    ("async-socket-receiver.py", ["--processing-time", "-1"], "--processing-time"),
    ("async-socket-receiver.py", ["--queue-size", "0"], "--queue-size"),
    ("async-socket-receiver.py", ["--queue-bytes", "0"], "--queue-bytes"),
    ("async-socket-receiver.py", ["--queue-bytes", str(2**41)], "--queue-bytes"),
    ("async-socket-receiver.py", ["--stats-interval", "abc"], "--stats-interval"),
    # Issue 13: values that wrapped, overflowed or silently disabled a feature.
    ("async-socket-receiver.py", ["--port", "70000"], "--port"),
    ("async-socket-receiver.py", ["--confirm-port", "99999"], "--confirm-port"),
    ("async-socket-receiver.py", ["--port", "65535"], "--confirm-port"),  # no port + 1
    ("async-socket-sender.py", ["--delay", "nan"], "--delay"),
    ("async-socket-sender.py", ["--timeout", "inf"], "--timeout"),
    ("async-socket-sender.py", ["--heartbeat-interval", "nan"], "--heartbeat-interval"),
    ("async-socket-sender.py", ["--heartbeat-interval", "1000"], "--heartbeat-interval"),
    ("async-socket-sender.py", ["--messages", "5000000000"], "--messages"),
    ("async-socket-sender.py", ["--workers", "1000", "--messages", "5000000"], "--messages"),
    ("async-socket-sender.py", ["--size", "10000000000000"], "--size"),
    ("async-socket-receiver.py", ["--processing-time", "inf"], "--processing-time"),
    ("async-socket-receiver.py", ["--run-timeout", "nan"], "--run-timeout"),
    ("async-socket-receiver.py", ["--stats-interval", "nan"], "--stats-interval"),
    ("async-socket-sender.py", ["--stats-interval", "nan"], "--stats-interval"),
    ("async-socket-receiver.py", ["--hwm", "99999999999"], "--hwm"),
    ("async-socket-sender.py", ["--hwm", "99999999999"], "--hwm"),
    ("async-socket-receiver.py", ["--max-size", "99999999999"], "--max-size"),
    ("async-socket-sender.py", ["--connect", "inproc://x"], "--connect"),
    ("async-socket-sender.py", ["--connect", "tcp://127.0.0.1:0"], "--connect"),
    ("async-socket-sender.py", ["--connect", "tcp://127.0.0.1:70000"], "--connect"),
    ("async-socket-sender.py", ["--connect", "tcp://[::1]:70000"], "--connect"),
    ("async-socket-sender.py", ["--connect", "tcp://::1:5560"], "--connect"),  # no brackets
    ("async-socket-sender.py", ["--connect", "udp://127.0.0.1:5560"], "--connect"),
    ("async-socket-sender.py", ["--confirm", "--connect", "tcp://127.0.0.1:65535"],
     "--confirm"),  # its confirmations would come from port 65536
    ("async-socket-sender.py", ["--workers", str(cli.MAX_WORKERS + 1)], "--workers"),
    ("async-socket-sender.py", ["--workers", "100000"], "--workers"),
    ("async-socket-receiver.py", ["--allow-ip", "some-hostname"], "--allow-ip"),
    ("async-socket-receiver.py", ["--bind", "two words"], "--bind"),
])
def test_bad_values_exit_2_with_a_clear_error(script, args, flag):
    """Zero/negative/garbage/unknown/out-of-range values: exit 2, one 'error:' line naming
    the flag, no traceback."""
    result = run_cli(script, *args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    reason = result.stderr.strip().splitlines()[-1]  # after argparse's usage lines
    assert "error:" in reason and flag in reason, result.stderr
    assert "Traceback" not in result.stderr


def test_inproc_is_refused_with_its_reason():
    """--connect inproc://x names why: no receiver can live in another process."""
    result = run_cli("async-socket-sender.py", "--connect", "inproc://x")
    assert result.returncode == 2
    assert "no receiver can live in another process" in result.stderr, result.stderr


def test_good_endpoints_and_addresses_are_accepted():
    """IPv4, host names, bracketed IPv6 and ipc:// endpoints; IPv4/IPv6 --allow-ip addresses."""
    endpoints = ["tcp://127.0.0.1:5560", "tcp://localhost:1", "tcp://[::1]:65535",
                 "ipc:///tmp/pushpull.ipc"]
    config = SENDER.parse_args([a for ep in endpoints for a in ("--connect", ep)]
                               + ["--workers", str(cli.MAX_WORKERS), "--delay", "0"])
    assert list(config.endpoints) == endpoints and config.workers == cli.MAX_WORKERS
    config = RECEIVER.parse_args(["--allow-ip", "127.0.0.1", "--allow-ip", "0:0::1",
                                  "--port", "65535", "--confirm-port", "65534"])
    assert config.allow_ips == ("127.0.0.1", "::1")  # as ZAP reports a peer's address
    assert (config.port, config.confirm_port) == (65535, 65534)
    for bind in ("::1", "[::1]"):  # an IPv6 address goes in brackets in the endpoint
        config = RECEIVER.parse_args(["--bind", bind, "--port", "5560"])
        assert (config.endpoint, config.confirm_endpoint) == ("tcp://[::1]:5560",
                                                              "tcp://[::1]:5561")


# ---------------------------------------------------------------------------
# Units of pushpull
# ---------------------------------------------------------------------------
def encoder(workers=3, per_worker=5, worker=2, pad_to=0):
    """A MessageEncoder for a small run."""
    run = wire.RunInfo(random.getrandbits(63), workers, per_worker, 1)
    return run, wire.MessageEncoder(run, worker, 1234, 5678, pad_to)


def test_wire_roundtrip_keeps_every_field():
    """encode -> decode returns run, worker, task, text and time; END carries the sent count."""
    run, enc = encoder()
    cache = {}
    msg = wire.decode(enc.data(4), cache)
    raw, got_run, kind, worker, seq, sent_ns, resent, text, client, intended_ns = msg
    assert raw[:wire.RUN_KEY_SIZE] == enc.data(0)[:wire.RUN_KEY_SIZE]
    assert kind == wire.MessageKind.DATA
    assert got_run == run and got_run.planned == 15
    assert (worker, seq, text) == (2, 4, "Pusher-2[PID:1234/TID:5678] - Task 4")
    assert wire.client_name(msg) == "Pusher-2" and client == "" and not resent
    assert abs(sent_ns - time.time_ns()) < 5e9 and intended_ns == sent_ns  # no schedule
    scheduled = wire.decode(enc.data_at(3, 12345), cache)
    assert scheduled[wire.INTENDED_NS] == 12345 and scheduled[wire.SENT_NS] > 12345
    assert wire.decode(enc.data_at(3, 12345, warmup=True), cache)[wire.INTENDED_NS] is None
    again = wire.decode(wire.mark_resent(enc.data(1)), cache)
    assert again[wire.RESENT] and again[wire.TASK] == 1
    assert again[wire.RUN] is got_run  # the cached RunInfo
    end = wire.decode(enc.end(5), cache)
    assert end[wire.KIND] == wire.MessageKind.END and end[wire.TASK] == 5


def test_padding_reaches_the_size_and_decodes_to_the_same_text():
    """--size: a padded frame is at least pad_to bytes and decodes to the unpadded text."""
    _, enc = encoder(pad_to=500)
    frame = enc.data(3)
    assert len(frame) == 500
    assert wire.decode(frame, {})[wire.TEXT] == enc.text(3)


def test_plain_text_decodes_without_a_run():
    """Plain frames: the seed's text yields client and task; other text is 'plain', no task."""
    seed = wire.decode(b"Pusher-1[PID:1/TID:2] - Task 3", {})
    assert (seed[wire.RUN], wire.client_name(seed), seed[wire.TASK]) == \
        (None, "Pusher-1", 3)
    hello = wire.decode(b"hello", {})
    assert (hello[wire.RUN], wire.client_name(hello), hello[wire.TASK],
            hello[wire.TEXT]) == (None, "plain", -1, "hello")
    # Too many digits for int(), and digits that are not ASCII: text, but no task number.
    for text in ("x[y] - Task " + "9" * 5000, "x[y] - Task \u0663"):
        odd = wire.decode(text.encode(), {})
        assert (wire.client_name(odd), odd[wire.TASK]) == ("plain", -1), text[:20]


@pytest.mark.parametrize("frame", [
    b"",  # empty
    b"\xff\x01short",  # truncated header
    b"\xff\x01" + bytes(60),  # version 1 of the wire format
    b"\xff\x02" + bytes(60),  # zero workers
    b"\xc3\x28 not utf-8",  # invalid UTF-8 plain text
], ids=["empty", "truncated", "version-1", "no-workers", "bad-utf8"])
def test_invalid_frames_raise_invalid_message(frame):
    """Empty, bad header and non-UTF-8 frames raise wire.InvalidMessage (a ValueError)."""
    with pytest.raises(wire.InvalidMessage):
        wire.decode(frame, {})


def test_wire_frame_with_bad_fields_raises_invalid_message():
    """A well-formed header with a task outside its run, or non-UTF-8 text, is invalid."""
    run, enc = encoder(per_worker=5)
    out_of_run = bytearray(enc.data(0))
    task_at = wire.RUN_KEY_SIZE + 2 + 4
    out_of_run[task_at:task_at + 4] = (5).to_bytes(4, "big")
    with pytest.raises(wire.InvalidMessage):
        wire.decode(bytes(out_of_run), {})
    bad_text = bytearray(enc.data(0))
    bad_text[wire.HEADER_SIZE] = 0xFF
    with pytest.raises(wire.InvalidMessage):
        wire.decode(bytes(bad_text), {})


def test_latency_histogram_percentiles_within_one_percent():
    """p50/p99/max on known data (1..100000 µs, shuffled) are within 1 % of the exact values."""
    hist = latency.Histogram()
    values = list(range(1, 100_001))
    random.Random(7).shuffle(values)
    received_ns = 10**18  # latencies in µs as send times before one receive time
    for start in range(0, len(values), 1000):  # in batches, as the receiver adds them
        hist.add_batch(received_ns, [received_ns - v * 1000 for v in values[start:start + 1000]])
    assert hist.count == 100_000
    for fraction, exact in ((0.5, 50_000), (0.9, 90_000), (0.99, 99_000), (1.0, 100_000)):
        got = hist.percentile(fraction) / 1000
        assert abs(got - exact) <= 0.01 * exact, (fraction, got, exact)
    small = latency.Histogram()
    small.add_batch(received_ns, [received_ns - v for v in (5, 7, 9, 11, 300)])
    small.add_batch(received_ns, [received_ns + 3000])  # a clock a little ahead: 0, not -3
    assert small.percentile(0.1) == 0 and small.max_ns == 300
    assert small.percentile(0.5) == 7  # exact below 256 ns
    summary = hist.summary_ms()
    assert abs(summary["p50"] - 50.0) <= 0.5 and summary["max"] == 100.0


def test_send_turns_go_in_order_and_a_stop_frees_the_waiters():
    """SendTurns: first come, first served; a waiter gives up on stop and leaves the queue."""
    turns, stop, order = sendflow.SendTurns(), threading.Event(), []

    def gate():
        lock = threading.Lock()
        lock.acquire()
        return lock

    def take_then_give(number, gate):
        if turns.take(gate, stop):
            order.append(number)
            turns.give()
        else:
            order.append(f"{number} gave up")

    assert turns.take(gate(), stop)  # free: taken at once
    waiters = []
    for number in (1, 2):
        waiters.append(threading.Thread(target=take_then_give, args=(number, gate())))
        waiters[-1].start()
        wait_until(lambda: turns.waiting() == number, 5, f"{number} waiting")
    turns.give()
    for waiter in waiters:
        waiter.join(5)
    assert order == [1, 2] and turns.waiting() == 0
    assert turns.take(gate(), stop)  # free again
    late = threading.Thread(target=take_then_give, args=(3, gate()))
    late.start()
    wait_until(lambda: turns.waiting() == 1, 5, "3 waiting")
    stop.set()
    late.join(5)
    assert order[-1] == "3 gave up" and turns.waiting() == 0
    turns.give()
    assert turns.take(gate(), threading.Event())  # the turn was not lost to the waiter


def test_batch_queue_counts_messages_not_batches():
    """BatchQueue.qsize() and its bound count the messages inside the batches."""
    batches = receiveflow.BatchQueue(10, 1000)
    batches.put(receiveflow.Batch(0, list(range(4)), nbytes=40))
    batches.put(receiveflow.Batch(0, list(range(5)), nbytes=50))
    assert batches.qsize() == 9
    batches.put(receiveflow.Batch(0, [1], nbytes=10))
    assert batches.qsize() == 10 and batches.full()
    with pytest.raises(queue.Full):  # the bound is in messages
        batches.put(receiveflow.Batch(0, [1], nbytes=10), timeout=0.05)
    assert len(batches.get().items) == 4
    assert batches.qsize() == 6
    assert len(batches.take_all()) == 6 and batches.qsize() == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX open-file limits")
def test_too_few_open_files_for_the_workers_is_a_one_line_error():
    """--workers beyond what the open-file limit allows: exit 2 and one line, not a traceback
    per worker (each worker's socket needs a few file descriptors)."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    result = subprocess.run([sys.executable, str(ROOT / "async-socket-sender.py"),
                             "--workers", "1000", "--connect", "tcp://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30, preexec_fn=low_limit)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "open files" in lines[0] and "--workers 1000" in lines[0], lines
