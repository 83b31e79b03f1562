"""The ends of a run (issue 12): the receiver's warm stop takes everything that reached it,
the sender's flush is one deadline with a true bound, the spill file belongs to one
receiver and is checked, output paths are checked at start, and the spill counts agree.

Every test runs the real scripts as processes on 127.0.0.1, on free ports.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import RECEIVER, SENDER, free_port, load_script, timing_judged_on_load
from netns import network  # noqa: F401  (the fixture, used by name)
from pushpull import spill, wire

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SENDER_MODULE = load_script("async-socket-sender")
RECEIVER_MODULE = load_script("async-socket-receiver")
FAST = ("--quiet", "--no-file-log", "--processing-time", "0")


def spill_path(workdir, port):
    """The receiver's default spill file (SPILL_FILE) for `port`, in `workdir`."""
    return workdir / RECEIVER_MODULE.SPILL_FILE.replace("{port}", str(port))


def flood(procs, receiver, workers, messages, *extra):
    """A sender that sends as fast as it can; returns its exit status and summary."""
    sender = procs.sender("--workers", str(workers), "--messages", str(messages), "--delay",
                          "0", "--quiet", *extra, endpoints=[receiver.endpoint])
    status = sender.wait(60)
    return status, sender.summary(), sender


def assert_nothing_lost(summary):
    """Every message the receiver took in was processed, dropped as a duplicate or spilled."""
    assert summary["received"] == (summary["processed"] + summary["duplicates"]
                                   + summary["spilled"]), summary
    assert summary["unprocessed"] == 0, summary


def recover(procs, port, workdir):
    """Start a fast receiver on `port`, let it process the spill file, stop it: its summary."""
    again = procs.receiver(*FAST, port=port, name=f"again{port}")
    if spill_path(workdir, port).exists():
        again.wait_for_output(r"\[SPILL\] recovered messages processed; removed", timeout=30)
    assert again.stop() == 0, again.output()[-2000:]
    return again.summary()


# ---------------------------------------------------------------------------
# Warm stop: everything that reached the receiver is taken
# ---------------------------------------------------------------------------
def test_done_when_flood_then_ctrl_c_at_once_receives_everything(procs):
    """The issue's run: 50 x 10000 with no delay, Ctrl+C on the receiver the moment the
    sender exits: received == sent, exit 0, and no false word about senders sending."""
    receiver = procs.receiver(*FAST)
    status, sent, _ = flood(procs, receiver, 50, 10000)
    assert status == 0 and sent["sent"] == 500000, sent
    assert receiver.stop(60) == 0, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["received"] == 500000, got
    assert_nothing_lost(got)
    assert not receiver.lines(r"still sending|still receiving"), receiver.output()[-2000:]


def test_warm_stop_drains_far_past_the_queue_and_processes_it_all(procs, tmp_path):
    """A slow receiver with a small queue, a flood already in its pipes and buffers: the
    warm stop takes all of it, what is beyond the queue's bound goes to a file for
    memory's sake and is read back in bounded batches: every message processed, exit 0,
    no spill file left (issue 19, case 8: it was left with 13,108 'missing')."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.0001",
                              "--queue-size", "500")
    status, sent, _ = flood(procs, receiver, 50, 1000)
    assert status == 0 and sent["sent"] == 50000, sent
    assert receiver.stop(60) == 0, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["received"] == got["processed"] == 50000, got
    assert got["spilled"] == 0 and got["unprocessed"] == 0, got
    (entry,) = got["runs"]
    assert entry["received"] == 50000 and entry["missing"] == 0 and entry["spilled"] == 0
    # The point: far more arrived than the queue holds (500), and it was not dropped.
    line = receiver.wait_for_output(r"\[STOP\] stopping: no new messages")[0]
    beyond = int(re.search(r"\((\d+) of them beyond the queue's bound", line)[1])
    assert beyond > 10 * 500, line
    assert not receiver.lines(r"\[SPILL\]"), receiver.output()[-2000:]
    assert not receiver.lines(r"still sending|still receiving"), receiver.output()[-2000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("receiver_spill")]


def test_a_cold_stop_while_the_overflow_is_read_back_saves_the_rest(procs, tmp_path):
    """The same, with a second Ctrl+C while the drain's overflow is being processed: the
    spill file holds exactly what was not processed, the row says so (cold stop), and
    the next start processes it: together, each task once."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.0005",
                              "--queue-size", "500")
    status, sent, _ = flood(procs, receiver, 50, 1000)
    assert status == 0 and sent["sent"] == 50000, sent
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] stopping: no new messages; .* beyond the queue's")
    receiver.signal(signal.SIGINT)
    assert receiver.wait(60) == 0, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["stop"] == "cold", got
    assert_nothing_lost(got)
    assert got["spilled"] > 0 and got["runs"][0]["spilled"] == got["spilled"], got
    assert receiver.lines(rf"run [0-9a-f]{{8}} .*{got['spilled']} in the spill file"
                          r" \(cold stop\)")
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".drain", ".tmp"))]
    left = [int(re.search(r"backlog: (\d+) messages", line)[1])
            for line in receiver.lines(r"\[STOP\] backlog: ")]
    assert left == sorted(set(left), reverse=True), left  # never the same count twice
    again = recover(procs, receiver.port, tmp_path)
    assert again["recovered"] == got["spilled"], again
    assert got["processed"] + again["processed"] == got["received"], (got, again)
    assert again["duplicates"] == 0, again


def test_drain_ends_on_time_while_senders_keep_sending_and_says_how_many(network):
    """Two workers that keep sending through a slow link (their data keeps arriving at
    the link's pace, however busy the machine; two connections' windows fit the link's
    queue, so no loss stalls them): the drain stops after STOP_DRAIN_LIMIT, its line
    counts the two workers; all it took was processed or spilled (exit 0).

    The drain also ends after STOP_DRAIN_QUIET (250 ms) without a message: at 50 ms,
    measured at a load average of 3 to 22 on 2 cores, such a pause came (after 0.5 to
    4.9 s) while the sender was still sending. So the truth is asserted always, the
    drain's timing unless overloaded."""
    net = network()
    net.slow_link(net.receiver_hosts[0], "10mbit")
    receiver = net.receiver(*FAST, "--stats-interval", "0.2")
    sender = net.sender("--workers", "2", "--messages", "1000000", "--delay", "0", "--quiet",
                        "--timeout", "0.5", "--retries", "0")
    receiver.wait_for_output(r"\[STATS\] received [1-9]", timeout=20)
    receiver.signal(signal.SIGINT)
    assert receiver.wait(40) == 0, receiver.output()[-2000:]
    assert_nothing_lost(receiver.summary())
    # It was still sending: the receiver went away mid-run, so it gave up (whenever it
    # saw that: no race with the receiver's exit).
    assert sender.wait(30) == 1, sender.output()[-2000:]
    assert sender.summary()["failed_by_reason"]["receiver_down"] > 0, sender.summary()
    with timing_judged_on_load("a pause in arrivals ended the drain early"):
        lines = receiver.lines(r"\[STOP\] still receiving")
        assert lines, receiver.output()[-2000:]
        senders = int(re.search(r"messages from (\d+) sender workers", lines[0])[1])
        assert senders == 2, lines[0]


# ---------------------------------------------------------------------------
# Sender: one flush deadline, a true bound
# ---------------------------------------------------------------------------
def test_in_flight_bound_counts_every_buffer_on_the_way():
    """SNDHWM + RCVHWM + both kernels' (doubled) buffers + two 8 KiB batches, per message."""
    from pushpull import sendflow
    assert sendflow.in_flight_bound(1022, 1000, 200, 65536, 65536) == 1000 + 200 + 2 * 8 + 2 * 128
    # A message bigger than a batch still counts once per place it can sit.
    assert sendflow.in_flight_bound(10**6, 5, 7, 65536, 65536) == 5 + 7 + 2 + 2
    # The sender's bound assumes a receiver of ours: its high-water mark and buffer.
    assert SENDER_MODULE.RECEIVER_HWM == RECEIVER_MODULE.RECEIVE_HWM
    assert SENDER_MODULE.SOCKET_BUFFER == RECEIVER_MODULE.SOCKET_BUFFER


def test_slow_receiver_flush_delivers_all_or_exits_1_with_a_true_bound(procs):
    """Item 2: ten workers flood a slow receiver with a small queue. Either every sent
    message arrives and the sender exits 0, or it exits 1 and unflushed_at_most is at
    least what never arrived (and, with 1000-byte frames, less than all it sent)."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.0002",
                              "--queue-size", "100")
    status, sent, sender = flood(procs, receiver, 10, 2000, "--size", "1000", "--timeout", "1")
    assert sent["sent"] == 20000, sent
    assert receiver.stop(60) == 0, receiver.output()[-2000:]
    received = receiver.summary()["received"]
    if status == 0:
        assert sent["flush_complete"] and received == 20000, (sent, received)
    else:
        assert status == 1 and not sent["flush_complete"], sent
        assert 20000 - received <= sent["unflushed_at_most"] < 20000, (sent, received)
        assert sender.lines(r"\[EXIT\] flush timed out after 1 s: up to \d+ messages")


def test_slow_link_flood_delivers_all_or_exits_1_with_a_true_bound(network):
    """Item 2 across a 10 Mbit/s link: 50 workers flood more than the link carries within
    the flush deadline; what did not arrive is within the bound the sender gives, and
    exit 0 would mean all of it arrived."""
    net = network()
    net.slow_link(net.receiver_hosts[0], "10mbit")
    receiver = net.receiver(*FAST, "--run-timeout", "1")
    sender = net.sender("--workers", "50", "--messages", "1000", "--delay", "0", "--quiet",
                        "--timeout", "1")
    status = sender.wait(60)
    sent = sender.summary()
    assert sent["sent"] == 50000, sent
    # What is still on its way arrives at 10 Mbit/s; the [RUN] line comes once every
    # worker's END frame arrived, or 1 s after the last message.
    receiver.wait_for_output(r"\[RUN\]", timeout=60)
    assert receiver.stop(30) == 0, receiver.output()[-2000:]
    received = receiver.summary()["received"]
    if status == 0:
        assert sent["flush_complete"] and received == 50000, (sent, received)
    else:
        assert status == 1 and 50000 - received <= sent["unflushed_at_most"], (sent, received)


# ---------------------------------------------------------------------------
# The spill file: one receiver's, and checked
# ---------------------------------------------------------------------------
def test_two_receivers_in_one_directory_keep_their_backlogs_apart(procs, tmp_path):
    """Item 4: two receivers in one directory, both cold-stopped with a backlog: each
    saves its own spill file (named by its port), and each restart recovers its own."""
    receivers = [procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.05")
                 for _ in range(2)]
    for receiver in receivers:
        status, sent, _ = flood(procs, receiver, 4, 100)
        assert status == 0, sent
    spilled = []
    for receiver in receivers:
        receiver.signal(signal.SIGINT)
        receiver.wait_for_output(r"\[STOP\] stopping")
        receiver.signal(signal.SIGINT)
        assert receiver.wait(30) == 0, receiver.output()[-2000:]
        spilled.append(receiver.summary()["spilled"])
        assert spilled[-1] > 0 and spill_path(tmp_path, receiver.port).exists()
    for receiver, count in zip(receivers, spilled):
        assert recover(procs, receiver.port, tmp_path)["recovered"] == count


def test_a_second_receiver_refuses_a_spill_file_in_use(procs, tmp_path):
    """Item 4: the same --spill-file for two receivers: the second refuses, naming the
    owner, before it binds; the first is untouched."""
    shared = str(tmp_path / "shared.bin")
    first = procs.receiver(*FAST, "--spill-file", shared)
    second = procs.receiver(*FAST, "--spill-file", shared, wait_ready=False)
    assert second.wait(15) == 1
    assert re.search(rf"spill file {re.escape(shared)} is in use by another receiver"
                     rf" \(pid {first.pid}\)", second.output()), second.output()
    assert "Server is running" not in second.output()
    assert first.popen.poll() is None
    assert first.stop() == 0
    assert not os.path.exists(shared + spill.LOCK_SUFFIX)  # let go at exit


def saved_spill(path, tasks):
    """Write a spill file of `tasks` tasks of one run at `path`; returns the run's label."""
    run = wire.RunInfo(12345, 1, tasks, 1)
    encoder = wire.MessageEncoder(run, 1, 1, 1)
    cache = {}
    spill.save(str(path), [wire.decode(encoder.data(t), cache) for t in range(tasks)])
    return wire.run_label(run.run_id)


@pytest.mark.parametrize("damage", ["cut at a frame boundary", "flipped byte"])
def test_truncated_or_corrupt_spill_file_is_refused_and_kept(procs, tmp_path, damage):
    """Item 7: a spill file cut at a frame boundary, or with one byte changed, is found
    out at start: exit 1 with the reason, the file kept as it was."""
    port = free_port()
    path = spill_path(tmp_path, port)
    saved_spill(path, 5)
    data = path.read_bytes()
    if damage == "cut at a frame boundary":
        data = data[:len(data) - spill.TRAILER.size - len(spill.END_MARK)]
    else:
        data = data[:30] + bytes([data[30] ^ 0x20]) + data[31:]
    path.write_bytes(data)
    receiver = procs.receiver(*FAST, port=port, wait_ready=False)
    assert receiver.wait(15) == 1
    problem = "truncated after 5 frames" if damage.startswith("cut") else "fails its CRC"
    assert problem in receiver.output() and "kept" in receiver.output(), receiver.output()
    assert path.read_bytes() == data


def test_zero_length_and_invalid_only_spill_files_are_removed(procs, tmp_path):
    """Item 7: a zero-length spill file does not block the start; one whose frames are
    all invalid is counted once, then removed (not counted again at the next start)."""
    port = free_port()
    path = spill_path(tmp_path, port)
    path.write_bytes(b"")
    first = procs.receiver(*FAST, port=port, name="empty")
    assert not path.exists()
    assert first.stop() == 0
    junk = (b"\xff\x01not a frame",)
    spill.save(str(path), [junk + (None, wire.DATA)])
    second = procs.receiver(*FAST, port=port, name="invalid")
    second.wait_for_output(r"\[SPILL\] .* held no message to process \(1 invalid\); removed")
    assert not path.exists()
    assert second.stop() == 0 and second.summary()["invalid"] == 1
    third = procs.receiver(*FAST, port=port, name="after")
    assert third.stop() == 0 and third.summary()["invalid"] == 0


def test_stale_temporary_file_is_reported_and_removed(procs, tmp_path):
    """Item 7: PATH.tmp left by a receiver killed while saving: reported, removed."""
    port = free_port()
    temporary = tmp_path / (spill_path(tmp_path, port).name + spill.TEMPORARY_SUFFIX)
    temporary.write_bytes(spill.SPILL_MAGIC + b"half a save")
    receiver = procs.receiver(*FAST, port=port)
    assert receiver.lines(rf"\[SPILL\] removed .*{re.escape(temporary.name)}: a receiver"
                          r" was stopped"), receiver.output()
    assert not temporary.exists()
    assert receiver.stop() == 0


# ---------------------------------------------------------------------------
# Output paths checked at start; one set of spill counts on a failed write
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("script,flag", [
    (RECEIVER, "--json"), (SENDER, "--json"), (RECEIVER, "--spill-file"),
])
@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unwritable_output_path_exits_2_at_once(tmp_path, script, flag, where):
    """Item 5: --json or --spill-file where no file can be written: exit 2 at start with
    a one-line reason naming the flag, before any work (no socket, no log)."""
    path = str(tmp_path / "missing" / "x") if where == "missing directory" else str(tmp_path)
    args = [sys.executable, str(script), flag, path]
    if script == SENDER:
        args += ["--connect", f"tcp://127.0.0.1:{free_port()}", "--workers", "1"]
    else:
        args += ["--port", str(free_port()), "--no-file-log"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0] and path in errors[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_failed_spill_write_is_counted_once_everywhere(procs, tiny_disk):
    """Item 6: a cold stop whose spill file does not fit the disk: [RUN], runs[] and the
    top level all say 0 spilled, the loss is counted (exit 1), no .tmp is left."""
    receiver = procs.receiver("--quiet", "--no-file-log", "--processing-time", "0.05",
                              "--spill-file", str(tiny_disk / "spill.bin"))
    status, sent, _ = flood(procs, receiver, 4, 500, "--size", "200")
    assert status == 0, sent
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"\[STOP\] stopping")
    receiver.signal(signal.SIGINT)
    assert receiver.wait(30) == 1, receiver.output()[-2000:]
    got = receiver.summary()
    assert got["spilled"] == 0 and [r["spilled"] for r in got["runs"]] == [0], got
    assert got["unprocessed"] > 0 and got["received"] == 2000, got
    assert receiver.lines(rf"\[SPILL\] could not write .*; {got['unprocessed']} received"
                          r" but unprocessed messages LOST"), receiver.output()[-2000:]
    assert not receiver.lines(r"of them in the spill file")
    assert os.listdir(tiny_disk) == []


def test_json_summary_that_no_longer_fits_the_disk_is_said_and_exits_1(procs, tiny_disk,
                                                                         tmp_path):
    """--json passed the start check, then the disk filled up during the run: the sender
    says so in one line and exits 1, with no traceback and no half file left."""
    receiver = procs.receiver(*FAST)
    summary = tiny_disk / "sender.json"
    out = tmp_path / "sender.out"
    with open(out, "wb") as console:
        sender = subprocess.Popen(
            [sys.executable, str(SENDER), "--connect", receiver.endpoint, "--workers", "2",
             "--messages", "40", "--delay", "0.05", "--quiet", "--json", str(summary)],
            stdout=console, stderr=subprocess.STDOUT)
    try:
        with open(tiny_disk / "filler", "wb", buffering=0) as filler:  # the disk fills up
            try:
                while True:
                    filler.write(b"x" * 4096)
            except OSError:
                pass
        assert sender.wait(60) == 1
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
    text = out.read_text()
    assert "Traceback" not in text, text[-2000:]
    assert re.search(r"\[ERROR\] cannot write the --json summary to .*sender\.json", text), text
    assert re.search(r"\[EXIT\] the --json summary could not be written", text), text
    assert sorted(os.listdir(tiny_disk)) == ["filler"]
