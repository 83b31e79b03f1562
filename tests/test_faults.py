"""Fault injection on the real pair: kill -9, SIGSTOP/SIGCONT, garbage, port collisions,
double Ctrl+C, a flood into slow processing, and broken startups.

Every test runs the scripts as processes on 127.0.0.1 (free ports) and checks the JSON
summaries so that every planned message is accounted for.
"""

import random
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import zmq

from pushpull import cli, wire
from conftest import free_port, wait_until

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

HEARTBEAT = 0.5  # --heartbeat-interval used by the senders here
DETECT_LIMIT = HEARTBEAT + 1.0  # the spec: a dead or hung receiver is seen within this
# The spec's limit is the behaviour's own worst case (a hung receiver is seen after
# about 0.85 s here, even on a loaded machine): a test allows it twice over. Without
# detection (no ZMTP heartbeats) a stopped receiver is never seen down at all.
DETECT_BOUND = 2 * DETECT_LIMIT
QUIET_RECEIVER = ("--quiet", "--no-file-log", "--processing-time", "0")


def spill_name(port):
    """The receiver's default spill file name (SPILL_FILE) for `port`."""
    return f"receiver_spill_{port}.bin"


def sender_args(workers, messages, delay, timeout=1.0, retries=1, *extra):
    """The sender's command line: small heartbeat and timeouts keep the tests fast."""
    return ("--workers", str(workers), "--messages", str(messages), "--delay", str(delay),
            "--timeout", str(timeout), "--retries", str(retries),
            "--heartbeat-interval", str(HEARTBEAT), "--quiet", *extra)


def accounted(summary):
    """sent + every failure reason: must equal planned for a sender summary."""
    assert summary["failed"] == sum(summary["failed_by_reason"].values()), summary
    return summary["sent"] + summary["failed"]


def heartbeat_lines(sender, word):
    """The sender's [HEARTBEAT] lines that say `word` (down / up)."""
    return sender.lines(rf"\[HEARTBEAT\] .* {word}\b")


def wait_for_heartbeat(sender, word, count=1, timeout=10):
    """Wait for the count-th [HEARTBEAT] `word` line; returns seconds waited."""
    started = time.monotonic()
    sender.wait_for_output(rf"\[HEARTBEAT\] .* {word}\b", timeout=timeout, count=count)
    return time.monotonic() - started


def sent_so_far(sender):
    """Messages the sender has sent, from its [STATS] lines (0 before the first)."""
    hits = sender.lines(r"\[STATS\] sent \d+")
    return int(re.search(r"sent (\d+)", hits[-1])[1]) if hits else 0


def rss_kb(pid):
    """Resident set size of a process in kB, from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1])


def cold_stop(receiver):
    """Ctrl+C, wait for the [STOP] line, Ctrl+C again; returns the exit status."""
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] stopping")
    receiver.signal(signal.SIGINT)
    return receiver.wait(30)


# ---------------------------------------------------------------------------
# Sender: absent, dead, returning and hung receivers
# ---------------------------------------------------------------------------
def test_no_receiver_fails_every_message_as_receiver_down(procs):
    """Nothing listening: nothing counts as sent, every message fails as receiver_down."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sender = procs.sender("--workers", "3", "--messages", "5", "--delay", "0",
                          "--timeout", "0.3", "--retries", "1",
                          "--heartbeat-interval", str(HEARTBEAT), endpoints=[endpoint])
    status = sender.wait(20)
    assert status != 0, sender.output()[-2000:]
    result = sender.summary()
    assert result["planned"] == 15
    assert result["sent"] == 0
    assert result["failed"] == 15
    assert result["failed_by_reason"]["receiver_down"] == 15
    assert heartbeat_lines(sender, "down"), sender.output()[-2000:]
    assert sender.lines(r"\[EXIT\] only 0 of 15 messages sent")


def test_receiver_killed_mid_run_is_seen_and_counted(procs):
    """kill -9 of the receiver: [HEARTBEAT] down at once (FIN), exit 1, all counted."""
    receiver = procs.receiver(*QUIET_RECEIVER)
    sender = procs.sender(*sender_args(2, 200, 0.05, "1", "1", "--stats-interval", "0.2"),
                          endpoints=[receiver.endpoint])
    wait_until(lambda: sent_so_far(sender) >= 20, 15, "20 messages sent")
    receiver.signal(signal.SIGKILL)
    receiver.wait(10)
    waited = wait_for_heartbeat(sender, "down", timeout=DETECT_BOUND + 3)
    assert waited <= DETECT_BOUND, f"down seen after {waited:.2f} s"
    assert sender.wait(30) != 0, sender.output()[-2000:]
    result = sender.summary()
    assert accounted(result) == result["planned"] == 400
    assert result["failed_by_reason"]["receiver_down"] > 0
    assert 20 <= result["sent"] < 400
    assert result["receiver_down_events"] >= 1


def test_receiver_back_within_retry_window_run_completes(procs):
    """kill -9, then a new receiver on the same port within timeout x (1 + retries): resumes."""
    first = procs.receiver(*QUIET_RECEIVER, name="receiver_first")
    # Window: 2 s x (1 + 9) = 20 s, far more than a restart takes (about 1 s; several
    # on a busy machine): the restart's time is not bounded by the window under test.
    timeout, retries = 2.0, 9
    sender = procs.sender(*sender_args(2, 100, 0.02, timeout, retries, "--stats-interval", "0.2"),
                          endpoints=[first.endpoint])
    wait_until(lambda: sent_so_far(sender) >= 20, 15, "20 messages sent")
    killed_at = time.monotonic()
    first.signal(signal.SIGKILL)
    first.wait(10)
    wait_for_heartbeat(sender, "down", timeout=DETECT_BOUND + 3)
    assert sender.popen.poll() is None, "the run ended before the receiver came back"
    second = procs.receiver(*QUIET_RECEIVER, port=first.port, name="receiver_second")
    assert time.monotonic() - killed_at < timeout * (1 + retries), "restart outlasted the window"
    sender.wait_for_output(r"\[HEARTBEAT\] .* up\b", timeout=10, count=2)
    downs = [i for i, line in enumerate(sender.output().splitlines())
             if re.search(r"\[HEARTBEAT\] .* down\b", line)]
    ups = [i for i, line in enumerate(sender.output().splitlines())
           if re.search(r"\[HEARTBEAT\] .* up\b", line)]
    assert ups[-1] > downs[0], "no [HEARTBEAT] up after the down"
    status = sender.wait(30)
    result = sender.summary()
    assert result["sent"] == result["planned"] == 200
    assert result["failed"] == 0
    assert result["receiver_down_events"] >= 1
    second.wait_for_output(r"\[RUN\]", timeout=20)
    assert second.stop() == 0
    got = second.summary()
    assert 0 < got["received"] < result["sent"]  # the first receiver took some with it
    assert got["processed"] == got["received"]
    # Plain mode cannot tell what died with the first receiver; the new one's report
    # says how many it got, so the sender does not claim success. The new instance does
    # not speak for the old one (issue 20, case 5): at_risk is no more than the reports
    # lack, and not exact.
    assert status == 1, sender.output()[-2000:]
    assert result["receiver_report"]["received"] == got["received"]
    assert 0 < result["at_risk"] <= 200 - got["received"], result
    assert not result["at_risk_exact"], result
    assert sender.lines(r"\[EXIT\] up to \d+ of 200 sent messages may not have arrived: .*"
                        r" went down after it was handed messages")


def test_a_run_reported_incomplete_then_complete_is_judged_on_the_later_report(procs):
    """A sender quiet past the receiver's --run-timeout between its messages: the receiver
    reports the run incomplete, then complete after all once its last messages are
    worked. The sender waits for the later report and exits 0, not 1 on the first."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.3",
                              "--run-timeout", "1")
    # 2.5 s between a worker's messages: silent for about 1.9 s after each pair's work.
    sender = procs.sender("--workers", "2", "--messages", "3", "--delay", "2.5", "--quiet",
                          "--report-timeout", "30", endpoints=[receiver.endpoint])
    assert sender.wait(60) == 0, sender.output()[-2000:]
    result = sender.summary()
    assert result["receiver_report"]["received"] == 6 and result["at_risk"] == 0, result
    lines = receiver.lines(rf"\[RUN\] run {result['run_id']}")
    # In order: reported incomplete while the sender was quiet, then complete after all
    # (the sender's last messages were still being worked when it stopped sending).
    assert "received 6/6" not in lines[0] and "complete after all" in lines[-1], lines


def test_stopped_receiver_is_seen_down_and_loses_nothing(procs):
    """SIGSTOP: down through heartbeats; after SIGCONT every planned message arrives."""
    receiver = procs.receiver(*QUIET_RECEIVER)
    sender = procs.sender(*sender_args(2, 100, 0.05, "3", "3", "--stats-interval", "0.2"),
                          endpoints=[receiver.endpoint])
    wait_for_heartbeat(sender, "up")
    wait_until(lambda: sent_so_far(sender) >= 10, 15, "10 messages sent")
    receiver.signal(signal.SIGSTOP)
    try:
        waited = wait_for_heartbeat(sender, "down", timeout=DETECT_BOUND + 3)
    finally:
        receiver.signal(signal.SIGCONT)
    assert waited <= DETECT_BOUND, f"hung receiver seen down after {waited:.2f} s"
    assert sender.wait(30) == 0, sender.output()[-2000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 200
    assert result["flush_complete"] is True
    line = receiver.wait_for_output(r"\[RUN\]", timeout=20)[0]
    assert "received 200/200" in line and "missing 0" in line, line
    assert receiver.stop() == 0
    got = receiver.summary()
    assert got["received"] == got["processed"] == 200
    assert got["runs"][0]["missing"] == 0


# ---------------------------------------------------------------------------
# Receiver: bad input, port collision
# ---------------------------------------------------------------------------
def test_garbage_input_is_counted_and_valid_messages_keep_flowing(procs):
    """Raw bytes, bad UTF-8, empty, multipart and truncated frames: counted; a run still completes."""
    receiver = procs.receiver("--no-file-log", "--processing-time", "0")
    # 1. Raw non-ZMTP bytes through plain TCP sockets: an HTTP request, and junk that
    #    starts with 0xFF like a ZMTP greeting but is not one.
    raw_inputs = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4,
                  bytes(range(255, 0, -1)) * 4]
    for junk in raw_inputs:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as raw:
            raw.sendall(junk)
    # 2. Bad frames from a real ZeroMQ peer, then one plain message on the same
    #    connection: once it is processed, every frame before it was read.
    bad_frames = [[b"\xc3\x28 not utf-8 \xff\xfe"], [b""], [b"part one", b"part two"],
                  [b"\xff\x01\x00\x00"]]
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(receiver.endpoint)
        for frames in bad_frames:
            push.send_multipart(frames)
        push.send(b"garbage-probe[x] - Task 7")
        receiver.wait_for_output(r"\[PROC\] .*garbage-probe.*Task +7", timeout=10)
        # 3. A normal run afterwards: the receive thread is alive and nothing is lost.
        sender = procs.sender(*sender_args(4, 25, 0), endpoints=[receiver.endpoint])
        assert sender.wait(30) == 0, sender.output()[-2000:]
        result = sender.summary()
        assert result["sent"] == 100
        line = receiver.wait_for_output(r"\[RUN\]", timeout=15)[0]
        assert "received 100/100" in line and "missing 0" in line, line
    finally:
        ctx.destroy(linger=0)
    assert receiver.stop() == 0
    got = receiver.summary()
    # Each raw connection counts at least once (or, closed just before the stop, as an
    # unsettled connection); the bad frames exactly once each.
    unsettled = got["unsettled_connections"]
    assert got["invalid"] + unsettled >= len(raw_inputs) + len(bad_frames), got
    assert got["rejected_connections"] + unsettled >= len(raw_inputs), got
    # Raw bytes are never mistaken for messages: the probe is the only plain one.
    assert got["plain"] == 1, got
    assert got["received"] == got["processed"] == 101  # the run and the plain probe
    assert got["runs"][0]["received"] == 100


def test_multi_frame_message_led_by_a_wire_frame_is_read_as_documented(procs):
    """docs/internals.md, Wire format: a whole wire frame first is a message of its own, and the
    parts after it are the next message (here one multi-frame, invalid; one plain)."""
    receiver = procs.receiver("--no-file-log", "--processing-time", "0")
    encoder = wire.MessageEncoder(wire.RunInfo(random.getrandbits(63), 1, 2, 1),
                                      1, 1, 1)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(receiver.endpoint)
        push.send_multipart([encoder.data(0), b"part one", b"part two"])
        push.send_multipart([encoder.data(1), b"tail[x] - Task 3"])
        receiver.wait_for_output(r"\[RUN\].*received 2/2")
        receiver.wait_for_output(r"\[PROC\] .*tail .*Task +3")
    finally:
        ctx.destroy(linger=0)
    assert receiver.stop() == 0
    got = receiver.summary()
    assert (got["invalid"], got["plain"], got["processed"]) == (1, 1, 3), got


def test_oversized_message_drops_its_peer_and_others_go_on(procs):
    """A frame over --max-size (ZMQ_MAXMSGSIZE) makes ZeroMQ drop that peer; others go on.

    libzmq discards the frame before the application sees it, so the receiver
    cannot count it (docs/delivery.md); our own sender refuses to send
    such a frame and counts it as too_large.
    """
    receiver = procs.receiver(*QUIET_RECEIVER, "--max-size", "2000")
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        dropped = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        push.connect(receiver.endpoint)
        push.send(b"x" * 5000)
        # The receiver drops the connection on the oversized frame: proof it arrived.
        assert dropped.poll(10000), "the oversized frame never reached the receiver"
        sender = procs.sender(*sender_args(2, 20, 0), endpoints=[receiver.endpoint])
        assert sender.wait(30) == 0, sender.output()[-2000:]
        assert sender.summary()["sent"] == 40
        line = receiver.wait_for_output(r"\[RUN\]", timeout=15)[0]
        assert "received 40/40" in line, line
    finally:
        ctx.destroy(linger=0)
    # Header and text alone are over 60 bytes (--size over --max-size is a usage error).
    too_big = procs.sender(*sender_args(2, 5, 0, 1, 1, "--max-size", "60"),
                           endpoints=[receiver.endpoint])
    assert too_big.wait(30) != 0
    refused = too_big.summary()
    assert refused["sent"] == 0 and refused["failed_by_reason"]["too_large"] == 10, refused
    assert receiver.stop() == 0
    got = receiver.summary()
    assert got["received"] == got["processed"] == 40, got


def test_second_receiver_on_taken_port_exits_with_in_use(procs):
    """A second receiver on a port in use exits non-zero within seconds and says 'in use'."""
    first = procs.receiver(*QUIET_RECEIVER)
    second = procs.receiver(*QUIET_RECEIVER, port=first.port, wait_ready=False)
    assert second.wait(20) != 0  # at once; the bound only tells it from a hang
    assert "in use" in second.output(), second.output()
    assert "Server is running" not in second.output()
    assert first.popen.poll() is None, "the first receiver must be untouched"


# ---------------------------------------------------------------------------
# Receiver: warm and cold stop with a backlog
# ---------------------------------------------------------------------------
def test_double_sigint_spills_backlog_and_next_start_recovers_it(procs, tmp_path):
    """Cold stop: received = processed + spilled, spill file kept; the next start processes it."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.05")
    sender = procs.sender(*sender_args(4, 100, 0), endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    assert sender.summary()["sent"] == 400
    assert cold_stop(receiver) == 0, receiver.output()[-2000:]
    first = receiver.summary()
    assert first["stop"] == "cold"
    assert first["received"] == 400
    assert first["spilled"] > 0
    assert first["received"] == first["processed"] + first["spilled"], first
    assert first["unprocessed"] == 0
    spill_file = tmp_path / spill_name(receiver.port)
    assert spill_file.exists()
    assert receiver.lines(rf"\[SPILL\] {first['spilled']} received but unprocessed")

    second = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0",
                            port=receiver.port, name="receiver_again")
    second.wait_for_output(r"\[SPILL\] recovered messages processed; removed", timeout=20)
    assert not spill_file.exists()
    assert second.stop() == 0
    again = second.summary()
    assert again["recovered"] == first["spilled"]
    assert again["processed"] == first["spilled"]
    assert again["received"] == again["processed"] and again["spilled"] == 0
    # Together the two lifetimes processed each of the 400 exactly once.
    assert first["processed"] + again["processed"] == 400
    assert again["duplicates"] == 0
    # The startup line reports the same count as the summaries.
    recovered_line = second.lines(r"\[SPILL\] \d+ messages recovered")
    assert recovered_line, second.output()[-2000:]
    assert f"[SPILL] {first['spilled']} messages recovered" in recovered_line[0], (
        recovered_line[0], first["spilled"])


def test_single_sigint_processes_whole_backlog(procs):
    """Warm stop: the backlog is really processed, with [STOP] backlog progress; nothing spilled."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.002")
    # --report-timeout 0: the sender leaves once its heartbeat could have seen a silent cut
    # (about 1.5 s); most of the 4000 still wait, beyond the batch being processed (at
    # most 1000 messages, not counted as waiting).
    sender = procs.sender(*sender_args(4, 1000, 0, 1.0, 1, "--report-timeout", "0"),
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    assert sender.summary()["sent"] == 4000
    receiver.signal(signal.SIGINT)
    assert receiver.wait(30) == 0, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["stop"] == "warm"
    assert got["received"] == got["processed"] == 4000
    assert got["spilled"] == 0 and got["unprocessed"] == 0
    assert not (receiver.out_path.parent / spill_name(receiver.port)).exists()
    # At 0.002 s a message, 1000 waiting are 2 s of work: a progress line is due each second.
    stopping = receiver.lines(r"\[STOP\] stopping: .*processing the \d+ waiting")
    assert stopping, receiver.output()[-2000:]
    backlog = int(re.search(r"processing the (\d+) waiting", stopping[0])[1])
    assert backlog >= 1000, f"backlog too small to prove anything: {stopping[0]}"
    assert receiver.lines(r"\[STOP\] backlog: \d+ messages left"), receiver.output()[-2000:]
    run_line = receiver.lines(r"\[RUN\]")
    assert run_line and "received 4000/4000" in run_line[0] and "missing 0" in run_line[0]


# ---------------------------------------------------------------------------
# Flood into slow processing
# ---------------------------------------------------------------------------
def test_flood_into_slow_receiver_keeps_memory_flat_and_backpressure(procs):
    """50 workers, no delay, 0.1 s per message: RSS stays flat, senders wait, nobody is 'down'."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.1",
                              "--queue-size", "1000")
    # Far more than the HWMs and kernel buffers of 50 connections hold.
    sender = procs.sender(*sender_args(50, 40000, 0, "1", "1"),
                          endpoints=[receiver.endpoint])
    # A worker waiting on a live receiver: the queue, the HWMs and the buffers are full.
    sender.wait_for_output(r"\[WAIT\] .*backpressure", timeout=15)
    started = time.monotonic()
    samples = []  # (seconds since the pipeline was full, kB)
    while time.monotonic() - started < 3.0:
        samples.append((time.monotonic() - started, rss_kb(receiver.pid)))
        time.sleep(0.25)  # pacing of the sampling loop
    first, peak, last = samples[0][1], max(kb for _, kb in samples), samples[-1][1]
    assert peak < 100 * 1024, samples
    assert last <= 1.2 * first, samples
    assert not heartbeat_lines(sender, "down"), sender.output()[-2000:]
    assert sender.popen.poll() is None, "the flood ended early"
    sender.signal(signal.SIGINT)
    assert sender.wait(30) == 130, sender.output()[-2000:]
    result = sender.summary()
    assert accounted(result) == result["planned"] == 2000000
    assert result["failed_by_reason"]["interrupted"] > 0
    assert result["failed"] == result["failed_by_reason"]["interrupted"]
    assert result["receiver_down_events"] == 0
    assert cold_stop(receiver) == 0, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["received"] == got["processed"] + got["spilled"], got
    assert got["received"] <= result["sent"]


# ---------------------------------------------------------------------------
# Sender Ctrl+C
# ---------------------------------------------------------------------------
def test_sender_double_sigint_exits_at_once(procs):
    """Second Ctrl+C during a flush that would block for --timeout: exit 130 at once."""
    flush_bound, at_once = 20, 10.0  # seconds: the blocked flush, and "at once" with margin
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0",
                              "--queue-size", "1", "--hwm", "1")
    # Large messages fill the kernel buffers fast; with the receiver stopped, what the
    # sender queued cannot leave, so the first Ctrl+C's flush would wait 20 s.
    sender = procs.sender(*sender_args(1, 1000, 0, flush_bound, "5", "--size", "200000",
                                       "--hwm", "5", "--stats-interval", "0.2"),
                          endpoints=[receiver.endpoint])
    wait_until(lambda: sent_so_far(sender) >= 5, 15, "5 messages sent")
    receiver.signal(signal.SIGSTOP)
    try:
        sender.wait_for_output(r"\[WAIT\] ", timeout=10)
        sender.signal(signal.SIGINT)
        sender.wait_for_output(r"\[STOP\] interrupted", timeout=5)
        # The flush is still blocked (nothing can leave toward a stopped receiver).
        assert "Sender summary" not in sender.output()
        started = time.monotonic()
        sender.signal(signal.SIGINT)
        status = sender.wait(10)
        took = time.monotonic() - started
    finally:
        receiver.signal(signal.SIGCONT)
    assert status == 130
    assert took < at_once, f"took {took:.2f} s"
    assert not sender.json_path.exists(), "exited at once: no summary"
    assert "interrupted again" in sender.output()


SIGINT_FLUSH_TIMEOUT = 10  # seconds: the sender's --timeout, so its flush deadline


@pytest.mark.parametrize("workers, messages, delay, sent_first", [
    (2, 100, 0.05, 10),  # the seed's pace: workers wait between messages
    (20, 100000, 0, 20000),  # no delay: most workers wait for their turn to send
    (cli.MAX_WORKERS, 100, 0.5, 2 * cli.MAX_WORKERS),  # the cap: stopping them all is quick
], ids=["paced", "turns", "max-workers"])
def test_sender_single_sigint_prints_summary_and_counts_interrupted(procs, workers, messages,
                                                                    delay, sent_first):
    """First Ctrl+C: stop, flush, summary, exit 130; sent + interrupted == planned.

    --timeout is also the flush deadline: 1 s is too short for a thousand sockets on a
    loaded machine (4 in 10 such flushes timed out with two busy loops and two more of
    these tests beside them), so the flush gets SIGINT_FLUSH_TIMEOUT.
    """
    receiver = procs.receiver(*QUIET_RECEIVER)
    sender = procs.sender(*sender_args(workers, messages, delay, SIGINT_FLUSH_TIMEOUT, "1",
                                       "--stats-interval", "0.2"),
                          endpoints=[receiver.endpoint])
    wait_until(lambda: sent_so_far(sender) >= sent_first, 15, f"{sent_first} messages sent")
    sender.signal(signal.SIGINT)
    assert sender.wait(3 * SIGINT_FLUSH_TIMEOUT) == 130, sender.output()[-2000:]
    result = sender.summary()
    interrupted = result["failed_by_reason"]["interrupted"]
    assert result["sent"] >= sent_first and interrupted > 0
    assert result["sent"] + interrupted == result["planned"] == workers * messages
    assert result["failed"] == interrupted
    assert result["flush_complete"] is True
    assert "Sender summary" in sender.output()
    assert sender.lines(r"\[EXIT\] interrupted")
    # Everything the sender counted as sent arrived.
    assert receiver.stop() == 0
    assert receiver.summary()["received"] == result["sent"]


# ---------------------------------------------------------------------------
# Receiver startup failures
# ---------------------------------------------------------------------------
def start_must_fail(procs, *args, within=10.0, port=None):
    """Start a receiver that must exit non-zero at once; returns its output."""
    started = time.monotonic()
    receiver = procs.receiver(*args, wait_ready=False, port=port)
    status = receiver.wait(15)
    took = time.monotonic() - started
    output = receiver.output()
    assert status != 0, output
    assert took < within, f"took {took:.2f} s"
    assert "Server is running" not in output
    return output


def test_unwritable_log_file_fails_at_once(procs):
    """--log-file in a missing directory: non-zero exit with a clear message."""
    output = start_must_fail(procs, "--log-file", "/nonexistent/dir/x.log")
    assert "/nonexistent/dir/x.log" in output, output


def host_has(address):
    """True if this host has `address`, an IP address or an interface name."""
    if address in {name for _, name in socket.if_nameindex()}:
        return True
    try:
        with socket.socket(socket.AF_INET) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("address, reason", [
    ("999.1.1.1", "neither an address nor an interface"),  # not an address at all
    ("192.0.2.1", "not an address of this host"),  # TEST-NET-1, not configured here
    ("nonsense", "neither an address nor an interface"),
    ("eth99", "neither an address nor an interface"),  # an interface this host lacks
])
def test_bad_bind_address_is_one_line_and_exit_1(procs, address, reason):
    """--bind to what this host does not have: exit 1, one line naming it and why."""
    if host_has(address):
        pytest.skip(f"this host has {address}")
    started = time.monotonic()
    receiver = procs.receiver("--no-file-log", "--bind", address, wait_ready=False)
    assert receiver.wait(15) == 1, receiver.output()
    assert time.monotonic() - started < 10, "a bind error is seen at once"
    output = receiver.output()
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot bind" in errors[0], output
    assert repr(address) in errors[0] and reason in errors[0], errors[0]
    assert "Traceback" not in output and "Server is running" not in output


def test_corrupt_spill_file_fails_at_once_and_is_kept(procs, tmp_path):
    """Junk in the spill file: non-zero exit, and the file is left exactly as it was."""
    port = free_port()
    spill_file = tmp_path / spill_name(port)
    junk = b"this is not a spill file\x00\x01\x02"
    spill_file.write_bytes(junk)
    output = start_must_fail(procs, "--no-file-log", port=port)
    assert spill_name(port) in output and "kept" in output, output
    assert spill_file.read_bytes() == junk
