"""The pair end to end with the seed's shape: counts, [RUN] line, exit codes, logs."""

import re
import socket
import time

import pytest
import zmq

from conftest import free_port
from pushpull import logs
from helpers import (MESSAGE_COLUMN, Tail, alignment_report, bad_prefixes, log_lines,
                     pipe_offsets)

FAST_RECEIVER = ("--processing-time", "0.001")
PER_WORKER = 120
TOTAL = 120 * PER_WORKER


def test_seed_shaped_run_is_fully_accounted(procs):
    """5 workers x 4 messages: [RUN] 20/20, missing 0, JSON counts on both sides."""
    receiver = procs.receiver("--processing-time", "0.001")
    sender = procs.sender("--workers", "5", "--messages", "4", "--delay", "0.01",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0
    run_line = receiver.wait_for_output(r"\[RUN\]")[0]
    assert "received 20/20" in run_line and "missing 0" in run_line
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["spilled"]) == (20, 20, 0)
    assert summary["runs"][0]["planned"] == 20 and summary["runs"][0]["missing"] == 0
    assert sender.summary()["sent"] == 20


def test_seed_defaults_shape_200_messages(procs):
    """20 workers x 10 messages: 200 received/processed, one [RUN] 200/200, sender 200/200/0."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--delay", "0.01", endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\]")
    receiver.wait_for_output(r"\[PROC\]", count=200)
    assert receiver.stop() == 0
    run_lines = receiver.lines(r"\[RUN\]")
    assert len(run_lines) == 1, "expected exactly one [RUN] line:\n" + "\n".join(run_lines)
    assert "received 200/200" in run_lines[0] and "missing 0" in run_lines[0]
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["invalid"]) == (200, 200, 0)
    assert [(r["planned"], r["received"], r["missing"]) for r in summary["runs"]] == \
        [(200, 200, 0)]
    result = sender.summary()
    assert (result["planned"], result["sent"], result["failed"]) == (200, 200, 0)
    assert len(sender.lines(r"\[MSG #")) == 200
    assert len(receiver.lines(r"\[MSG #")) == 200


def check_alignment(name, text, tags=("[MSG #", "[PROC]")):
    """Assert the seed's fixed-width format on every log line of `text`; returns the lines."""
    lines = log_lines(text)
    assert lines, f"{name}: no log lines"
    bad = bad_prefixes(lines)
    assert not bad, f"{name}: lines not in 'YYYY-MM-DD HH:MM:SS.cc - LEVEL   - ':\n{bad[:3]}"
    for tag in tags:
        count, kinds = alignment_report(lines, tag)
        assert count, f"{name}: no {tag} lines"
        assert len(kinds) == 1, f"{name}: {tag} '|' columns differ:\n" + "\n".join(
            f"{offsets}: {line}" for offsets, line in list(kinds.items())[:4])
    return lines


def test_logs_stay_aligned_at_120_workers_x_120_messages(procs, tmp_path):
    """Every [MSG]/[PROC] '|' column fixed in both consoles and server_logs.txt, past the
    seed's breaking points (Pusher-100, Task 100, MSG #1000), WARNING lines mixed in,
    2-decimal timestamps. (The issue's 120 x 1000 took 41 s here; the unit test below
    covers the widest values.)"""
    receiver = procs.receiver("--processing-time", "0")
    sender = procs.sender("--workers", "120", "--messages", str(PER_WORKER), "--delay", "0",
                          endpoints=[receiver.endpoint])
    # Mix a WARNING into the receiver's stream mid-run: a frame with a broken header.
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.connect(receiver.endpoint)
        Tail(receiver.out_path).wait_for(r"\[MSG #", 30, receiver)
        intruder.send(b"\xff\x01broken")
        intruder.close(linger=2000)
    finally:
        ctx.term()
    assert sender.wait(45) == 0, sender.output()[-2000:]
    Tail(receiver.out_path).wait_for(rf"\[RUN\] .*received {TOTAL}/{TOTAL}", 45, receiver)
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["invalid"]) == \
        (TOTAL, TOTAL, 1)

    receiver_lines = check_alignment("receiver console", receiver.output())
    file_lines = check_alignment("server_logs.txt",
                                 (tmp_path / "server_logs.txt").read_text(encoding="utf-8"))
    sender_lines = check_alignment("sender console", sender.output(), tags=("[MSG #",))
    for name, lines in (("receiver", receiver_lines), ("file", file_lines)):
        assert sum("[MSG #" in line for line in lines) == TOTAL, name
        assert sum("[PROC]" in line for line in lines) == TOTAL, name
        warnings = [line for line in lines if " - WARNING - " in line]
        assert any("[INVALID]" in line for line in warnings), f"{name}: no WARNING mixed in"
        assert all(line[MESSAGE_COLUMN - 3:MESSAGE_COLUMN] == " - " for line in lines)
    assert sum("[MSG #" in line for line in sender_lines) == TOTAL
    # The widest values of this run really were logged (the columns the seed broke on).
    assert any(f"[MSG #{TOTAL:07d}]" in line for line in sender_lines)
    assert any("[Pusher-120  ]" in line and "| Task    119 |" in line
               for line in receiver_lines)


def test_workers_without_a_delay_all_get_turns_early(procs):
    """--delay 0: workers send in turns (SendTurns), so none waits for another to finish."""
    workers, per_worker = 4, 5000
    receiver = procs.receiver("--processing-time", "0", "--quiet", "--no-file-log")
    sender = procs.sender("--workers", str(workers), "--messages", str(per_worker),
                          "--delay", "0", endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    # [MSG #n] numbers are taken at send time: sorted, they give the order of the sends.
    sends = sorted((int(m[1]), m[2]) for m in
                   (re.search(r"\[MSG #(\d+)\] ZMQ \[(Pusher-\d+)", line)
                    for line in sender.lines(r"\[MSG #")))
    assert len(sends) == workers * per_worker
    first_half = {name for _, name in sends[:len(sends) // 2]}
    assert first_half == {f"Pusher-{n}" for n in range(1, workers + 1)}, first_half
    receiver.wait_for_output(r"\[RUN\].*received 20000/20000")


def test_line_formats_keep_fixed_offsets_at_the_configurable_limits():
    """msg_line/proc_line: '|' offsets equal for task 0 and 999999, MSG #1 and #9,999,999,
    worker 1 and 99999, and plain messages without a task."""
    target = "Server:*:5560"
    text = "Pusher-1[PID:1/TID:2] - Task 3"
    msg_offsets = {pipe_offsets(logs.msg_line(n, client, target, task, text))
                   for n in (1, 999, 1000, 9_999_999)
                   for client in ("Pusher-1", "Pusher-99999", "plain")
                   for task in (-1, 0, 99, 100, 999_999)}
    proc_offsets = {pipe_offsets(logs.proc_line("Server:5560", client, task, text))
                    for client in ("Pusher-1", "Pusher-99999", "plain")
                    for task in (-1, 0, 99, 100, 999_999)}
    assert len(msg_offsets) == 1, msg_offsets
    assert len(proc_offsets) == 1, proc_offsets
    assert "[MSG #9999999] ZMQ [Pusher-99999]" in logs.msg_line(
        9_999_999, "Pusher-99999", target, 999_999, text)
    assert "| Task 999999 |" in logs.proc_line("Server:5560", "Pusher-99999", 999_999, text)


def test_plain_text_from_a_foreign_push_client_is_received_logged_counted(procs):
    """Single-frame text from a plain pyzmq PUSH (no wire header) is received, logged, counted."""
    receiver = procs.receiver(*FAST_RECEIVER)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(receiver.endpoint)
        push.send(b"hello")
        push.send(b"Pusher-1[PID:1/TID:2] - Task 3")
        push.send(b"x[y] - Task " + b"9" * 5000)  # too long a number: text, no task
        receiver.wait_for_output(r"\[PROC\]", count=3)
        push.close(linger=0)
    finally:
        ctx.term()
    msg_lines = receiver.lines(r"\[MSG #")
    proc_lines = receiver.lines(r"\[PROC\]")
    assert any(line.endswith("| hello") and "[plain" in line for line in msg_lines), msg_lines
    assert any(re.search(r"\[Pusher-1 *\].*\| Task +3 \| Pusher-1\[PID:1/TID:2\] - Task 3$",
                         line) for line in msg_lines), msg_lines
    assert any(line.endswith("Processing: hello") for line in proc_lines), proc_lines
    assert any("[plain" in line and line.endswith("9" * 5000) for line in msg_lines), msg_lines
    assert len({pipe_offsets(line[:200]) for line in msg_lines}) == 1
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["plain"], summary["invalid"]) \
        == (3, 3, 3, 0)
    assert summary["runs"] == []


def test_receiver_exits_quickly_when_its_port_is_in_use(procs):
    """A second receiver on a taken port exits non-zero within 5 s, saying the port is in use."""
    first = procs.receiver(*FAST_RECEIVER)
    second = procs.receiver(*FAST_RECEIVER, port=first.port, wait_ready=False)
    status = second.wait(20)  # at once; the bound only tells it from a hang
    assert status != 0
    assert "in use" in second.output()
    assert "Server is running" not in second.output()
    assert first.popen.poll() is None  # the first one is unharmed


def test_a_second_receiver_in_the_same_directory_is_told_the_port_first(procs):
    """Same port, same directory, so the same default spill file: the second receiver is
    told the port is in use (the real conflict), not that the spill file is."""
    first = procs.receiver(*FAST_RECEIVER)
    second = procs.receiver(*FAST_RECEIVER, port=first.port, wait_ready=False)
    assert second.wait(30) == 1
    errors = second.lines(r"\[ERROR\]")
    assert len(errors) == 1, second.output()
    assert f"cannot bind tcp://127.0.0.1:{first.port}: port {first.port} is in use" \
        in errors[0], errors
    assert "spill file" not in second.output()
    assert first.popen.poll() is None  # the first one is unharmed, its lock kept
    assert (procs.workdir / f"receiver_spill_{first.port}.bin.lock").exists()


def test_receiver_exits_when_a_non_zmq_program_holds_the_port(procs):
    """A plain TCP listener on the port: the receiver refuses to start, exit non-zero, 'in use'."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        receiver = procs.receiver(*FAST_RECEIVER, port=port, wait_ready=False)
        status = receiver.wait(20)
    assert status != 0
    assert "in use" in receiver.output()


def test_workers_waiting_for_one_cause_log_one_line_each_and_a_count(procs):
    """No receiver, 20 workers: one [WAIT], one [RETRY] per retry and one [FAIL] line, not
    one per worker; then a count per cause, exact, before the summary."""
    nobody = f"tcp://127.0.0.1:{free_port()}"
    sender = procs.sender("--workers", "20", "--messages", "2", "--delay", "0",
                          "--timeout", "0.3", "--retries", "2", "--heartbeat-interval", "0.5",
                          endpoints=[nobody])
    assert sender.wait(30) == 1, sender.output()[-3000:]
    output = sender.output()
    assert len(sender.lines(r"\[WAIT\] Pusher-\d+ paused: receiver is down$")) == 1, output
    for retry in (1, 2):
        assert len(sender.lines(rf"\[RETRY\] Pusher-\d+: .* retry {retry}/2$")) == 1, output
    assert len(sender.lines(r"\[FAIL\] Pusher-\d+ gives up at task 0:")) == 1, output
    counts = sender.lines(r"\[(WAIT|RETRY|FAIL)\] 20 workers ")
    assert [line.split(" - ", 2)[2] for line in counts] == [
        "[WAIT] 20 workers paused: receiver is down",
        "[RETRY] 20 workers retried: receiver still down after 0.3 s, retry 1/2",
        "[RETRY] 20 workers retried: receiver still down after 0.3 s, retry 2/2",
        "[FAIL] 20 workers gave up: receiver down for 0.9 s"], output
    assert output.index(counts[-1]) < output.index("==== Sender summary")
    assert sender.summary()["failed_by_reason"]["receiver_down"] == 40


def test_sender_without_receiver_fails_with_one_exit_line(procs):
    """No receiver: non-zero exit, one one-line [EXIT] reason, JSON failed = planned, sent 0."""
    nobody = f"tcp://127.0.0.1:{free_port()}"
    sender = procs.sender("--workers", "3", "--messages", "4", "--delay", "0",
                          "--timeout", "0.3", "--retries", "1", "--heartbeat-interval", "0.5",
                          endpoints=[nobody])
    assert sender.wait(15) != 0
    exit_lines = sender.lines(r"\[EXIT\]")
    assert len(exit_lines) == 1, sender.output()[-2000:]
    assert re.search(r"\[EXIT\] \S.*\d", exit_lines[0])
    tail = sender.output().split(exit_lines[0], 1)[1]
    assert tail.strip() == "", f"[EXIT] reason is not the last, single line: {tail!r}"
    result = sender.summary()
    assert (result["planned"], result["sent"], result["failed"]) == (12, 0, 12)


def host_has_ipv6_loopback():
    """True if a TCP socket can bind ::1 here."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not host_has_ipv6_loopback(), reason="this host has no ::1")
def test_pair_runs_over_ipv6(procs):
    """--bind ::1 and --connect tcp://[::1]:PORT: data, confirmations and --allow-ip ::1."""
    port = free_port()
    receiver = procs.receiver(*FAST_RECEIVER, "--bind", "::1", "--allow-ip", "::1", port=port)
    receiver.wait_for_output(rf"\[START\] PULL socket bound to tcp://\[::1\]:{port}")
    sender = procs.sender("--workers", "2", "--messages", "10", "--delay", "0", "--confirm",
                          endpoints=[f"tcp://[::1]:{port}"])
    assert sender.wait() == 0, sender.output()[-2000:]
    assert sender.summary()["confirmed"] == 20
    receiver.wait_for_output(r"\[RUN\].*received 20/20")
    assert receiver.stop() == 0
    assert receiver.summary()["processed"] == 20


def test_padded_messages_are_all_counted(procs):
    """--size 500: every padded message is received and processed; logs show the text only."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "4", "--messages", "25", "--delay", "0",
                          "--size", "500", endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\].*received 100/100")
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["invalid"]) == (100, 100, 0)
    assert summary["runs"][0]["missing"] == 0
    assert all(re.search(r"- Task \d+$", line) for line in receiver.lines(r"\[MSG #"))


def test_quiet_mode_prints_no_per_message_lines(procs):
    """--quiet on both: no [MSG]/[PROC] lines, but [RUN] and both summaries are there."""
    receiver = procs.receiver(*FAST_RECEIVER, "--quiet")
    sender = procs.sender("--workers", "3", "--messages", "10", "--delay", "0", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\].*received 30/30")
    assert receiver.stop() == 0
    for proc in (receiver, sender):
        assert not proc.lines(r"\[MSG #|\[PROC\]"), proc.output()[-2000:]
    assert "==== Receiver summary ====" in receiver.output()
    assert "==== Sender summary ====" in sender.output()
    assert receiver.summary()["processed"] == 30


def test_stats_lines_show_counts_and_sender_eta(procs):
    """--stats-interval 0.2: both print [STATS] with counts; the sender's shows sent N/M and ETA."""
    receiver = procs.receiver("--processing-time", "0.01", "--stats-interval", "0.2")
    sender = procs.sender("--workers", "2", "--messages", "30", "--delay", "0.04",
                          "--stats-interval", "0.2", endpoints=[receiver.endpoint])
    sender_stats = sender.wait_for_output(r"\[STATS\]", count=2, timeout=15)
    receiver_stats = receiver.wait_for_output(r"\[STATS\]", count=2, timeout=15)
    assert sender.wait() == 0
    for line in sender_stats:
        match = re.search(r"sent (\d+)/60\b.*ETA (\d+\.\d s|-)", line)
        assert match, line
        assert int(match.group(1)) <= 60
    assert any(int(re.search(r"sent (\d+)/", line).group(1)) > 0 for line in sender_stats)
    for line in receiver_stats:
        assert re.search(r"received \d+ .*processed \d+ .*queue \d+", line), line
    assert any(int(re.search(r"received (\d+)", line).group(1)) > 0 for line in receiver_stats)
    receiver.wait_for_output(r"\[RUN\].*received 60/60")
    assert receiver.stop() == 0


def test_run_rate_is_its_own_not_the_receivers_lifetime(procs):
    """A paced run (1 worker, 11 messages 0.1 s apart) after an idle receiver: its [RUN] line
    and runs[] give its own rate, about 11 msg/s from its first message to its last (never
    above: the delays only stretch under load), while the lifetime rate counts the idle time."""
    receiver = procs.receiver("--processing-time", "0", "--quiet")
    sender = procs.sender("--workers", "1", "--messages", "11", "--delay", "0.1", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\].*received 11/11")
    # On the [RUN] line's continuation line (the only run here).
    line = receiver.wait_for_output(rf" - INFO    - {logs.CONTINUED}rate ")[0]
    msg_s = float(re.search(r" rate (\d+\.\d) msg/s \d+\.\d+ MB/s \|", line)[1])
    assert 3 < msg_s <= 12, line
    assert receiver.stop() == 0
    summary = receiver.summary()
    run = summary["runs"][0]
    assert run["rate_msg_s"] == msg_s and 0 < run["rate_mb_s"] < 0.01, run
    assert summary["processed_per_s"] < msg_s, summary  # idle before and after the run
    assert receiver.lines(r"rate .* msg/s processed over the receiver's lifetime")


def test_own_short_runs_raise_no_invalid_alarm(procs):
    """Short runs, even one that sends nothing and closes at once, and overlapping ones:
    the receiver counts no invalid input and logs no [INVALID] line for our own senders."""
    receiver = procs.receiver("--processing-time", "0", "--quiet")
    for messages in (0, 1, 0, 1):
        senders = [procs.sender("--workers", "5", "--messages", str(messages), "--delay", "0",
                                "--quiet", endpoints=[receiver.endpoint]) for _ in range(2)]
        for sender in senders:
            assert sender.wait() == 0, sender.output()[-2000:]
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert summary["invalid"] == 0 and summary["rejected_connections"] == 0, summary
    assert not receiver.lines(r"\[INVALID\]"), receiver.output()[-2000:]


def long_lines(proc):
    """The lines of a process's output over logs.LINE_WIDTH columns, per-message lines
    ([MSG], [PROC]: they carry the sender's text) aside."""
    return [line for line in proc.output().splitlines()
            if len(line) > logs.LINE_WIDTH and not re.search(r" - \[(MSG #\d+|PROC)\] ", line)]


def test_status_lines_fit_in_160_columns(procs):
    """A default-ish pair, a run with many missing tasks (its [RUN] line lists 20 ranges),
    and a sender without a receiver: every line but the per-message ones fits 160 columns."""
    from pushpull import wire
    receiver = procs.receiver("--processing-time", "0", "--run-timeout", "1")
    sender = procs.sender("--delay", "0", endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-2000:]
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.PUSH) as gaps:
            gaps.connect(receiver.endpoint)
            run = wire.RunInfo(1234567, 50, 100, 1)
            for worker in range(1, 50, 2):  # every other worker, every 7th task
                encoder = wire.MessageEncoder(run, worker, 1, 1)
                for task in range(0, 100, 7):
                    gaps.send(encoder.data(task))
            gaps.close(linger=10000)
    finally:
        ctx.term()
    # Reported when silent for 1 s: on a busy machine maybe before all 375 frames came,
    # with more missing; its ranges fill the 20 listed either way.
    receiver.wait_for_output(rf"\[RUN\] run {wire.run_label(run.run_id)} .*missing \d+")
    nobody = procs.sender("--messages", "2", "--timeout", "0.3", "--retries", "1",
                          "--heartbeat-interval", "0.5",
                          endpoints=[f"tcp://127.0.0.1:{free_port()}"])
    assert nobody.wait(30) == 1, nobody.output()[-2000:]
    assert receiver.stop() == 0
    assert receiver.lines(r" - {10,}Pusher-\d+:.*\.\.\. \+\d+$")  # the ranges' end
    for proc in (receiver, sender, nobody):
        assert long_lines(proc) == [], proc.output()[-3000:]
