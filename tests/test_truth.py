"""Issue 19: no peer, full disk or stop can fake the verdict: gates without a value,
figures without samples, logs on a full disk, stops at any moment, smaller lies."""

import json
import signal
import socket
import sys
import time

import pytest
import zmq

from conftest import wait_until


def test_a_gate_with_no_samples_fails_and_no_percentile_reads_zero(procs):
    """Case 5: every message in the --warmup seconds: no latency sample. The p99 gate has
    no value and fails (exit 1, value null, and why); every percentile is null in the
    JSON and n/a in the text, never 0."""
    receiver = procs.receiver("--processing-time", "0")
    sender = procs.sender("--workers", "2", "--messages", "10", "--rate", "200", "--warmup",
                          "1000", "--max-p99", "0.001", endpoints=[receiver.endpoint])
    assert sender.wait(30) == 1, sender.output()[-2000:]
    (gate,) = sender.summary()["gates"]
    assert gate["value"] is None and not gate["passed"] and gate["reason"], gate
    assert sender.lines(r"\[GATE\] max-p99 FAILED: .*no value")
    line = receiver.wait_for_output(r"\[RUN\] run .*received 20/20")[0]
    assert "latency p50 n/a p99 n/a p99.9 n/a max n/a" in line, line
    assert receiver.stop() == 0
    got = receiver.summary()
    (entry,) = got["runs"]
    assert entry["latency_samples"] == 0
    for figures in (entry["latency_ms"], entry["latency_raw_ms"], got["latency_ms"]):
        assert set(figures.values()) == {None}, figures
    assert receiver.lines(r"  run [0-9a-f]{8} +20/20 .*p50 n/a, p99 n/a")
    assert "0.00 ms" not in receiver.output()


@pytest.mark.parametrize("whose", ["receiver", "sender"])
def test_a_full_disk_under_the_log_file_never_silences_the_console(procs, tiny_disk, whose):
    """Case 6: the log file's disk fills mid-run: one [ERROR] line says so, the file is
    dropped, the console goes on to the summary, the exit status is 1; no traceback."""
    log_file = str(tiny_disk / "log.txt")
    receiver_log = ("--log-file", log_file) if whose == "receiver" else ()
    sender_log = ("--log-file", log_file) if whose == "sender" else ()
    receiver = procs.receiver("--processing-time", "0", *receiver_log)
    sender = procs.sender("--workers", "2", "--messages", "500", "--delay", "0", *sender_log,
                          endpoints=[receiver.endpoint])
    sender_status = sender.wait(60)
    receiver.wait_for_output(r"\[RUN\] run .*received 1000/1000", timeout=20)
    receiver_status = receiver.stop()
    full, other = (receiver, sender) if whose == "receiver" else (sender, receiver)
    status = receiver_status if whose == "receiver" else sender_status
    assert status == 1 and (sender_status if whose == "receiver" else receiver_status) == 0
    errors = full.lines(r"\[ERROR\] log file .*log\.txt: no space left on device")
    assert len(errors) == 1, full.output()[-3000:]
    assert "Logging error" not in full.output() and "Traceback" not in full.output()
    assert full.lines(r"={10,}|Receiver summary|Sender summary"), full.output()[-2000:]
    assert full.summary()["processed" if whose == "receiver" else "sent"] == 1000


def test_peer_counts_are_settled_before_they_are_written(procs):
    """Case 7: ten senders that connect, send one message and leave, beside ten idle TCP
    connections, then a stop a moment later: no connection is counted invalid or
    rejected on a guess that had not settled."""
    from test_hostile import frame, rid
    receiver = procs.receiver("--processing-time", "0", "--no-file-log")
    idle = [socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
            for _ in range(10)]
    ctx = zmq.Context()
    try:
        run_id = rid()
        for task in range(10):
            push = ctx.socket(zmq.PUSH)
            push.connect(receiver.endpoint)
            push.send(frame(run_id, per_worker=10, task=task))
            push.close(linger=5000)
        receiver.wait_for_output(r"\[RUN\] run .*received 10/10")
        time.sleep(0.5)  # the senders' disconnects reach the monitor (no outcome depends on it)
        assert receiver.stop() == 0
    finally:
        ctx.term()
        for conn in idle:
            conn.close()
    got = receiver.summary()
    assert (got["invalid"], got["rejected_connections"]) == (0, 0), got
    assert not receiver.lines(r"\[INVALID\]")
