"""--confirm: every planned task confirmed processed, across kills, cold stops and no receiver.

Real processes on 127.0.0.1. The sender's JSON (confirmed / resent / unconfirmed)
and the receivers' JSON (processed, duplicates, per-run resent) must agree with
what the test did to the receivers.
"""

import re
import signal
import subprocess
import sys
import time

import zmq

from pushpull import channel, security
from conftest import ROOT, SENDER, Proc, free_port, wait_until

FAST_RECEIVER = ("--processing-time", "0", "--no-file-log", "--run-timeout", "1")
# A sender that notices a lost receiver fast and waits for it long enough for a restart.
RESILIENT = ("--heartbeat-interval", "0.5", "--timeout", "2", "--quiet")
STATS = re.compile(r"\[STATS\] received (\d+) .*\| processed (\d+) .*\| queue (\d+)")


# The real sender script, run with one method patched to force a thread interleaving.
PATCHED_SENDER = """
import importlib.util, sys, time
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("sender_under_test", {script!r})
sender = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sender
spec.loader.exec_module(sender)
from pushpull import windows
{patch}
sys.exit(sender.main())
"""


def stats(receiver):
    """(received, processed, queue) from every [STATS] line the receiver printed so far."""
    return [tuple(map(int, STATS.search(line).groups())) for line in receiver.lines(STATS.pattern)]


def processed_at_least(receiver, count):
    """A predicate: the receiver's [STATS] say it processed `count` messages or more."""
    return lambda: any(p >= count for _, p, _ in stats(receiver))


def stopped_summary(receiver):
    """Warm-stop a receiver; its JSON summary."""
    assert receiver.stop() == 0, receiver.output()[-2000:]
    return receiver.summary()


def assert_accounted(summary):
    """Every message a receiver took in was processed, dropped as a duplicate, or spilled."""
    assert summary["received"] == (summary["processed"] + summary["duplicates"]
                                   + summary["spilled"]), summary
    assert summary["unprocessed"] == 0, summary


def assert_all_confirmed(sender, planned):
    """The sender exited 0 with every planned task confirmed; returns its JSON."""
    assert sender.wait(40) == 0, sender.output()[-3000:]
    result = sender.summary()
    assert result["planned"] == planned
    assert result["confirmed"] == planned, result
    assert result["unconfirmed"] == 0 and result["unconfirmed_tasks"] == {}, result
    return result


def test_confirm_run_confirms_every_task(procs):
    """Receiver up throughout: exit 0, all confirmed, nothing resent, receiver processed all."""
    receiver = procs.receiver(*FAST_RECEIVER, "--quiet")
    sender = procs.sender("--confirm", "--workers", "4", "--messages", "250", "--delay", "0",
                          "--quiet", endpoints=[receiver.endpoint])
    result = assert_all_confirmed(sender, 1000)
    assert result["receiver_down_events"] == 0, result
    receiver.wait_for_output(rf"\[RUN\] run {result['run_id']} \| received 1000/1000")
    summary = stopped_summary(receiver)
    assert summary["processed"] + summary["duplicates"] == summary["received"], summary
    assert_accounted(summary)
    run = summary["runs"][0]
    assert run["run_id"] == result["run_id"] and run["confirm"] is True
    assert run["received"] == 1000 and run["missing"] == 0, run
    # Last: with the receiver up throughout, no confirmation may go missing, so
    # nothing is resent and nothing is processed twice.
    assert result["resent"] == 0, sender.lines(r"\[RESEND\]")
    assert summary["processed"] == 1000 and summary["duplicates"] == 0, summary


def test_stats_show_confirmation_progress_while_the_receiver_works(procs):
    """All sent at once to a slow receiver: the sender's [STATS] lines go on, counting
    what is confirmed, never above the summary's final count."""
    receiver = procs.receiver("--processing-time", "0.01", "--no-file-log", "--quiet")
    sender = procs.sender("--confirm", "--workers", "2", "--messages", "100", "--delay", "0",
                          "--quiet", "--stats-interval", "0.2", endpoints=[receiver.endpoint])
    result = assert_all_confirmed(sender, 200)
    counts = [int(n) for n in re.findall(r"\| confirmed (\d+)/200", sender.output())]
    # 2 s of work at 0.01 s a message: lines while it is still under way, and rising.
    assert any(0 < n < 200 for n in counts), sender.output()[-2000:]
    assert counts == sorted(counts) and counts[-1] <= result["confirmed"], counts


def test_kill_9_then_restart_completes_the_run(procs):
    """Receiver SIGKILLed mid-run, restarted on the same port: resends make confirmed == planned."""
    first = procs.receiver(*FAST_RECEIVER, "--quiet", "--stats-interval", "0.1")
    sender = procs.sender("--confirm", "--workers", "4", "--messages", "300",
                          "--delay", "0.003", *RESILIENT, endpoints=[first.endpoint])
    wait_until(processed_at_least(first, 150), 20, "the first receiver's first 150 tasks")
    first.signal(signal.SIGKILL)
    first.wait(10)
    assert sender.popen.poll() is None, "the run ended before the kill: not mid-run"
    assert max(p for _, p, _ in stats(first)) < 1200, "the first receiver got the whole run"
    sender.wait_for_output(rf"\[HEARTBEAT\] receiver {re.escape(first.endpoint)} down")
    second = procs.receiver(*FAST_RECEIVER, "--quiet", port=first.port)
    result = assert_all_confirmed(sender, 1200)
    assert result["resent"] > 0 and result["receiver_down_events"] >= 1, result
    assert sender.lines(r"\[RESEND\] Pusher-\d+: a receiver went down; resending \d+")
    summary = stopped_summary(second)
    assert_accounted(summary)
    runs = [r for r in summary["runs"] if r["run_id"] == result["run_id"]]
    assert len(runs) == 1, summary["runs"]
    assert 0 < runs[0]["resent"] <= result["resent"], (runs[0], result["resent"])
    run_line = second.lines(rf"\[RUN\] run {result['run_id']} ")
    assert run_line and re.search(rf"\| resent {runs[0]['resent']} \|", run_line[0]), run_line


def test_two_receivers_one_killed_run_completes_on_the_other(procs):
    """2 receivers, one SIGKILLed mid-run: the survivor gets the resends, confirmed == planned."""
    doomed = procs.receiver(*FAST_RECEIVER, "--quiet", "--stats-interval", "0.1")
    survivor = procs.receiver(*FAST_RECEIVER, "--quiet", "--stats-interval", "0.1")
    sender = procs.sender("--confirm", "--workers", "4", "--messages", "300",
                          "--delay", "0.003", *RESILIENT,
                          endpoints=[doomed.endpoint, survivor.endpoint])
    wait_until(processed_at_least(doomed, 60), 20, "the doomed receiver's first 60 tasks")
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    assert sender.popen.poll() is None, "the run ended before the kill: not mid-run"
    survivor_at_kill = max((p for _, p, _ in stats(survivor)), default=0)
    result = assert_all_confirmed(sender, 1200)
    assert result["receiver_down_events"] >= 1, result
    assert sender.lines(rf"\[HEARTBEAT\] receiver {re.escape(doomed.endpoint)} down")
    summary = stopped_summary(survivor)
    assert_accounted(summary)
    run = [r for r in summary["runs"] if r["run_id"] == result["run_id"]][0]
    assert run["received"] <= 1200 and run["endpoints"] == 2, run
    # It took over: well past its fair half, and far past what it had at the kill.
    assert run["received"] > 600 and summary["processed"] > survivor_at_kill, (run, summary)


def test_cold_stop_then_restart_loses_nothing_and_counts_duplicates(procs, tmp_path):
    """Double Ctrl+C with a backlog spills it; the restart recovers it, resends are duplicates."""
    workdir = tmp_path / "shared"
    workdir.mkdir()
    first = procs.receiver("--processing-time", "0.005", "--no-file-log", "--quiet",
                           "--stats-interval", "0.1", cwd=workdir, name="first")
    sender = procs.sender("--confirm", "--workers", "4", "--messages", "150", "--delay", "0",
                          *RESILIENT, endpoints=[first.endpoint])
    wait_until(lambda: any(0 < p <= r - 100 for r, p, _ in stats(first)), 20,
               "a backlog of 100 received but unprocessed messages")
    first.signal(signal.SIGINT)
    first.wait_for_output(r"\[STOP\] stopping")
    first.signal(signal.SIGINT)
    assert first.wait(20) == 0, first.output()[-2000:]
    assert sender.popen.poll() is None, "the run ended before the cold stop"
    spilled = first.summary()
    assert spilled["stop"] == "cold" and spilled["spilled"] > 0, spilled
    assert_accounted(spilled)
    assert (workdir / f"receiver_spill_{first.port}.bin").exists()
    second = procs.receiver(*FAST_RECEIVER, "--quiet", port=first.port, cwd=workdir,
                            name="second")
    result = assert_all_confirmed(sender, 600)
    assert result["resent"] > 0, result
    summary = stopped_summary(second)
    assert_accounted(summary)
    assert summary["recovered"] == spilled["spilled"], (summary, spilled)
    # Every spilled task was unconfirmed, so it also came back as a resend: a duplicate.
    assert summary["duplicates"] >= summary["recovered"], summary
    assert spilled["processed"] + summary["processed"] >= 600, (spilled, summary)
    assert not (workdir / f"receiver_spill_{first.port}.bin").exists()
    run = [r for r in summary["runs"] if r["run_id"] == result["run_id"]][0]
    assert run["duplicates"] >= summary["recovered"], run
    # The [RUN] line shows the duplicates counted by the time the run was reported.
    run_line = second.lines(rf"\[RUN\] run {result['run_id']} \|")
    shown = re.search(r"\| duplicates (\d+) \|", run_line[0]) if run_line else None
    assert shown and 0 < int(shown[1]) <= run["duplicates"], run_line


def test_no_receiver_exits_nonzero_listing_every_task(procs):
    """Nothing listening: the sender gives up, exit 1, and lists every task of every worker."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    sender = procs.sender("--confirm", "--workers", "3", "--messages", "5", "--timeout", "0.5",
                          "--retries", "1", "--heartbeat-interval", "0.5", "--quiet",
                          endpoints=[endpoint])
    status = sender.wait(30)
    elapsed = time.monotonic() - started
    assert status == 1, sender.output()[-2000:]
    result = sender.summary()
    assert result["confirmed"] == 0 and result["resent"] == 0, result
    assert result["unconfirmed"] == 15, result
    assert result["unconfirmed_tasks"] == {f"Pusher-{n}": [0, 1, 2, 3, 4] for n in (1, 2, 3)}
    assert result["failed_by_reason"]["receiver_down"] == 15, result
    # It gives up after timeout x (1 + retries) = 1 s, plus start-up and flush: the bound
    # only tells that from a hang, with a busy machine's margin.
    assert elapsed < 20, elapsed
    assert sender.lines(r"\[EXIT\] only 0 of 15 messages confirmed")


def test_window_full_is_backpressure_and_bounds_the_receiver_backlog(procs):
    """--window 5, slow receiver: sending waits ([WAIT] window full), backlog <= workers x window.

    At 0.05 s a message and 4 workers, a worker's window frees a slot about every
    0.2 s, so each full window is waited on for longer than the 0.1 s that logs [WAIT].
    """
    receiver = procs.receiver("--processing-time", "0.05", "--no-file-log", "--quiet",
                              "--stats-interval", "0.2")
    sender = procs.sender("--confirm", "--window", "5", "--workers", "4", "--messages", "8",
                          "--delay", "0", "--quiet", endpoints=[receiver.endpoint])
    result = assert_all_confirmed(sender, 32)
    assert sender.lines(r"\[WAIT\] Pusher-\d+ waiting: 5 messages unconfirmed, window full")
    # Backpressure, not a lost receiver: nothing marked down, nothing resent.
    assert result["resent"] == 0 and result["receiver_down_events"] == 0, result
    assert not sender.lines(r"\[HEARTBEAT\] .* down")
    summary = stopped_summary(receiver)
    assert summary["processed"] == 32 and summary["duplicates"] == 0, summary
    # Received but not yet processed: at most workers x window (no duplicates here).
    backlogs = [r - p for r, p, _ in stats(receiver)]
    assert len(backlogs) >= 3, receiver.output()[-2000:]  # the run took >= 1.6 s of work
    assert 0 < max(backlogs) <= 4 * 5, backlogs


def test_confirm_through_curve(procs, tmp_path):
    """CURVE on: the run is confirmed; a plain subscriber to the confirmation port hears nothing."""
    keys = tmp_path / "keys"
    done = subprocess.run([sys.executable, str(SENDER), "--generate-keys", str(keys)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    receiver = procs.receiver(*FAST_RECEIVER, "--quiet",
                              "--curve-server-key", str(keys / "server.key_secret"))
    confirm_endpoint = channel.confirm_endpoint(receiver.endpoint)
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.SUB)
        curve = ctx.socket(zmq.SUB)
        curve.curve_publickey, curve.curve_secretkey = security.load_secret_certificate(
            str(keys / "client.key_secret"))
        curve.curve_serverkey = security.load_public_key(str(keys / "server.key"))
        for sub in (plain, curve):
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(confirm_endpoint)
        sender = procs.sender("--confirm", "--workers", "2", "--messages", "100",
                              "--delay", "0.005", "--quiet",
                              "--curve-client-key", str(keys / "client.key_secret"),
                              "--curve-server-public", str(keys / "server.key"),
                              endpoints=[receiver.endpoint])
        heard = {"plain": 0, "curve": 0}
        poller = zmq.Poller()
        poller.register(plain, zmq.POLLIN)
        poller.register(curve, zmq.POLLIN)
        while sender.popen.poll() is None:
            for sub, _ in poller.poll(50):
                sub.recv_multipart()
                heard["plain" if sub is plain else "curve"] += 1
        result = assert_all_confirmed(sender, 200)
        assert result["resent"] == 0, result
        assert heard["curve"] > 0, heard  # a CURVE subscriber did hear confirmations
        assert heard["plain"] == 0, heard  # ... a plain one, connected as long, heard none
    finally:
        ctx.destroy(linger=0)
    summary = stopped_summary(receiver)
    assert summary["processed"] == 200 and summary["runs"][0]["confirm"] is True, summary


def patched_sender(workdir, patch, args, endpoint):
    """Start the real sender with `patch` applied to its module (caller cleans up)."""
    script = workdir / "patched_sender.py"
    script.write_text(PATCHED_SENDER.format(root=str(ROOT), script=str(SENDER), patch=patch))
    return Proc(script, ["--connect", endpoint, *args], workdir, "patched_sender")


def stall_times(sender):
    """Seconds (of the log clock) at which workers resent because confirmations stalled."""
    times = []
    for line in sender.lines(r"\[RESEND\] .*confirmations stalled"):
        hours, minutes, seconds = line.split(" ")[1].split(":")
        times.append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    return times


def test_confirmation_before_window_add_is_not_lost(procs, tmp_path):
    """A worker preempted between send() and window.add(): its confirmations must still count.

    A fast receiver can confirm a task before the worker records it as unconfirmed;
    under CPU load this happens by itself (seen about 1 run in 8). Here a 0.2 s
    pause before each add() makes it happen every time.
    """
    receiver = procs.receiver(*FAST_RECEIVER, "--quiet")
    late_add = (
        "original_add = windows.UnconfirmedWindow.add\n"
        "def late_add(self, task, frame):\n"
        "    time.sleep(0.2)\n"
        "    original_add(self, task, frame)\n"
        "windows.UnconfirmedWindow.add = late_add\n")
    sender = patched_sender(tmp_path, late_add, ["--confirm", "--workers", "2", "--messages", "5",
                                                  "--delay", "0", "--timeout", "1", "--quiet"],
                            receiver.endpoint)
    try:
        result = assert_all_confirmed(sender, 10)
        assert result["resent"] == 0, sender.lines(r"\[RESEND\]")
    finally:
        sender.cleanup()
    summary = stopped_summary(receiver)
    assert summary["processed"] == 10 and summary["duplicates"] == 0, summary


def test_lost_confirmations_are_resent_in_one_round(procs, tmp_path):
    """Every worker misses one confirmation: all stalled workers resend together, not in turn.

    A missed PUB message is real (a sender that re-subscribes after a receiver
    restart misses what was published before). The stall clock must be per
    worker: one worker's confirmations or resends must not hold back another's.
    """
    receiver = procs.receiver(*FAST_RECEIVER, "--quiet")
    lose_first = (
        "original_confirm = windows.UnconfirmedWindow.confirm\n"
        "def lossy_confirm(self, first, count):\n"
        "    if not getattr(self, 'lost_one', False):\n"
        "        self.lost_one = True\n"
        "        return 0\n"
        "    return original_confirm(self, first, count)\n"
        "windows.UnconfirmedWindow.confirm = lossy_confirm\n")
    sender = patched_sender(tmp_path, lose_first, ["--confirm", "--workers", "5", "--messages",
                                                    "20", "--delay", "0.01", "--timeout", "1",
                                                    "--quiet"], receiver.endpoint)
    try:
        result = assert_all_confirmed(sender, 100)
        stalls = stall_times(sender)
        assert not stalls or max(stalls) - min(stalls) < 0.5, sender.lines(r"\[RESEND\]")
        assert result["duration_s"] < 3.5, (result["duration_s"], sender.lines(r"\[RESEND\]"))
    finally:
        sender.cleanup()
    assert_accounted(stopped_summary(receiver))
