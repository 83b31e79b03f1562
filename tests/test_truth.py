"""Issue 19: no peer, full disk or stop can fake the verdict: gates without a value,
figures without samples, logs on a full disk, stops at any moment, smaller lies."""

import os
import signal
import socket
import sys
import threading
import time

import pytest
import zmq


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
    receiver.wait_for_output(r"\[RUN\] run .*received 20/20")
    # On the [RUN] line's continuation line (the only run here).
    assert receiver.lines(r" - INFO    -     .*latency p50 n/a p99 n/a p99.9 n/a max n/a"), \
        receiver.output()[-2000:]
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


@pytest.mark.parametrize("args, said", [
    (("--connect", "tcp://*:5560"), "* is for binding"),
    (("--size", "2000", "--max-size", "1000"), "--size 2000 is over --max-size 1000")])
def test_contradictory_sender_flags_are_usage_errors(args, said):
    """Case 8: a wildcard to connect to, a padding over the size limit: exit 2, one line."""
    from helpers import run_cli
    done = run_cli("async-socket-sender.py", *args, "--messages", "1")
    assert done.returncode == 2, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and said in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_frames_that_claim_the_impossible_are_invalid(procs):
    """Case 8: an END frame claiming 2**32-1 tasks of a 3-task worker, a frame naming 0
    endpoints: invalid, so sent_reported stays true and no row reads 'share of 0'."""
    from test_hostile import Pusher, frame, rid
    from pushpull import wire
    receiver = procs.receiver("--processing-time", "0", "--run-timeout", "1")
    client = Pusher(receiver.endpoint)
    try:
        run_id, zero = rid(), rid()
        client.send(*(frame(run_id, per_worker=3, task=t) for t in range(3)),
                    frame(run_id, per_worker=3, kind=wire.END, task=2 ** 32 - 1, text=b""),
                    frame(run_id, per_worker=3, kind=wire.END, task=3, text=b""),
                    frame(zero, endpoints=0), frame(rid(), per_worker=1))
        receiver.wait_for_output(r"\[RUN\] run .*received 1/1")
    finally:
        client.close()
    assert receiver.stop() == 0
    got = receiver.summary()
    assert got["invalid"] == 2, got
    (entry,) = [e for e in got["runs"] if e["run_id"] == wire.run_label(run_id)]
    assert entry["sent_reported"] == 3 and entry["complete"], entry
    assert wire.run_label(zero) not in [e["run_id"] for e in got["runs"]]
    assert "share of 0" not in receiver.output()
    assert receiver.lines(r"\[INVALID\] .*claims 4294967295 tasks sent")


def test_no_receiver_the_summary_agrees_with_itself(procs):
    """Case 8: no receiver at all: the 'receiver down' row names it never up beside the
    receiver_down count, and there is no send-lag figure or histogram for 0 sent."""
    from conftest import free_port
    sender = procs.sender("--workers", "2", "--messages", "10", "--rate", "100", "--timeout",
                          "0.5", "--retries", "0", endpoints=[f"tcp://127.0.0.1:{free_port()}"])
    assert sender.wait(30) == 1, sender.output()[-2000:]
    got = sender.summary()
    assert got["sent"] == 0 and got["failed_by_reason"]["receiver_down"] == 20, got
    assert got["receivers_never_up"] == [got["endpoints"][0]], got
    row = sender.lines(r"^  receiver down ")[0]
    assert "never up: tcp://127.0.0.1:" in row, row
    assert set(got["send_lag_ms"].values()) == {None}, got
    assert not sender.lines(r"Send lag|send lag"), sender.output()[-2000:]


def test_a_recovered_runs_figures_say_what_is_known(procs, tmp_path):
    """Case 8: after a spill recovery, [STATS] counts the recovered messages beside the
    received ones, and the recovered run's row has no rate or latency of 0 (no receive
    time was kept): n/a."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.05")
    sender = procs.sender("--workers", "2", "--messages", "200", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] stopping")
    receiver.signal(signal.SIGINT)
    assert receiver.wait(30) == 0
    spilled = receiver.summary()["spilled"]
    assert spilled > 0
    again = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.001",
                           "--stats-interval", "0.1", port=receiver.port, name="again")
    line = again.wait_for_output(r"\[STATS\] received 0 \(\+\d+ recovered\)", timeout=20)[0]
    assert f"(+{spilled} recovered)" in line, line
    again.wait_for_output(r"\[SPILL\] recovered messages processed", timeout=30)
    assert again.stop() == 0
    row = again.lines(r"^  run [0-9a-f]{8} ")[0]
    assert "rate n/a" in row and "p50 n/a" in row and "0.0 msg/s" not in row, row


# ---------------------------------------------------------------------------
# Stops (cases 9-11)
# ---------------------------------------------------------------------------
def test_a_third_ctrl_c_says_what_it_drops_and_removes_the_lock(procs, tmp_path):
    """Case 9: three Ctrl+C on a receiver with a backlog: exit 130 at once, its line
    counts the messages dropped, the lock file is gone; what the file holds (if the
    cold stop saved it first) is recovered by the next start. A cold stop that ends
    before the third signal is seen exits 0 with its summary: true as well."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.05")
    sender = procs.sender("--workers", "2", "--messages", "200", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    spill_file = tmp_path / f"receiver_spill_{receiver.port}.bin"
    lock = tmp_path / f"receiver_spill_{receiver.port}.bin.lock"
    assert lock.exists()
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] stopping: no new messages")
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] second signal")
    receiver.signal(signal.SIGINT)
    status = receiver.wait(30)
    assert not lock.exists()
    if status == 0:  # the cold stop ended before the third signal: its summary is the truth
        assert not receiver.lines(r"interrupted again"), receiver.output()[-2000:]
        assert receiver.summary()["spilled"] > 0
        dropped = 0
    else:
        assert status == 130, receiver.output()[-2000:]
        (line,) = receiver.lines(r"interrupted again: exiting at once")
        dropped = int(line.split("; ")[1].split()[0])
        assert "received but unprocessed messages dropped, not in the spill file" in line, line
    if dropped == 0:  # the cold stop had saved them all
        assert spill_file.exists()
    again = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0",
                           port=receiver.port, name="again")
    assert again.stop() == 0
    recovered = again.summary()["recovered"]
    assert dropped + recovered > 0 and (dropped == 0 or recovered == 0), (dropped, recovered)


def test_a_sigint_after_the_senders_summary_never_kills_it(procs):
    """Case 10: one Ctrl+C at moments after the sender's summary, into its exit: the
    status is 0 or 130, never death by the signal."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0")
    statuses = []
    for attempt in range(10):
        sender = procs.sender("--workers", "1", "--messages", "5", "--delay", "0", "--quiet",
                              endpoints=[receiver.endpoint], name=f"sender{attempt}")
        sender.wait_for_output(r"Sender summary", timeout=30)
        time.sleep(attempt * 0.004)  # a spread of moments in the exit
        sender.signal(signal.SIGINT)
        statuses.append(sender.wait(30))
    assert set(statuses) <= {0, 130}, statuses


ATTEMPTS = 100  # SIGINT-to-[STOP] checks, one receiver each
ANSWER_WITHIN = 1.0  # seconds; about 0.1 s is expected


def run_receiver_child(module, port, out, spill_path):
    """In a forked child: the receiver's main(), its console to `out`; never returns."""
    status = 1
    try:
        sys.stdout = sys.stderr = open(out, "w", buffering=1, encoding="utf-8")
        status = module.main(["--port", str(port), "--bind", "127.0.0.1", "--processing-time",
                              "0", "--quiet", "--no-file-log", "--spill-file",
                              str(spill_path)])
    finally:
        os._exit(status)  # noqa: B012 (a forked child never returns to pytest)


class FastTail:
    """The lines added to a file, looked at every 5 ms (helpers.Tail's 0.1 s would be
    most of each attempt)."""

    def __init__(self, path):
        from helpers import Tail
        self.tail = Tail(path)

    def wait_for(self, text, timeout):
        """The first new line holding `text`; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.tail.new_lines():
                if text in line:
                    return line
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
            time.sleep(0.005)


def sigint_to_stop_line(pid, port, out):
    """Flood the receiver, Ctrl+C it, and time its answer: from the signal to the time
    stamp of its [STOP] line (the main thread's log call; seconds, to 0.01 s)."""
    from test_hostile import frame, rid
    tail = FastTail(out)
    tail.wait_for("Server is running", 30)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.sndtimeo = 5000
    push.connect(f"tcp://127.0.0.1:{port}")
    run_id, flooding = rid(), threading.Event()

    def flood():  # in bursts, so this process leaves the machine's cores to the receiver
        task = 0
        while not flooding.wait(0.001):
            for _ in range(100):
                try:
                    push.send(frame(run_id, per_worker=2 ** 32 - 1, task=task), zmq.NOBLOCK)
                except zmq.Again:
                    break
                task += 1

    thread = threading.Thread(target=flood, name="flood")
    try:
        for _ in range(1000):  # under load before the signal
            push.send(frame(rid(), per_worker=2, task=0))
        thread.start()
        signalled = time.time()
        os.kill(pid, signal.SIGINT)
        line = tail.wait_for("[STOP]", 20)
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:22]) / 100
        return stamp - signalled
    finally:
        flooding.set()
        if thread.is_alive():
            thread.join(10)
        push.close(linger=0)
        ctx.term()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a forked receiver per attempt")
def test_a_receiver_under_load_answers_sigint_within_a_second(tmp_path):
    """Case 11: a receiver taking a flood answers Ctrl+C with its [STOP] line within
    ANSWER_WITHIN s, in each of ATTEMPTS tries (forked from one import: a fresh receiver
    each time, for the cost of its threads and sockets only)."""
    from conftest import free_port, load_script
    module = load_script("async-socket-receiver")
    answers = []
    for attempt in range(ATTEMPTS):
        port, out = free_port(), tmp_path / f"receiver{attempt}.out"
        pid = os.fork()
        if pid == 0:
            run_receiver_child(module, port, out, tmp_path / f"spill{attempt}.bin")
        try:
            answers.append(sigint_to_stop_line(pid, port, out))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    print("answers (s): median", sorted(answers)[len(answers) // 2], "worst", max(answers))
    assert max(answers) < ANSWER_WITHIN, sorted(answers)[-5:]
