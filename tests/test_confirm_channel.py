"""The confirmation channel with the real scripts: --confirm-port, forged confirmations,
silent channels, the receiver's report in the sender's summary, and the gates."""

import json
import re
import signal
import threading
import time
import uuid
from datetime import datetime

import pytest
import zmq

from pushpull import channel, instances, logs, wire
from conftest import free_port, wait_until

FAST_RECEIVER = ("--processing-time", "0", "--no-file-log", "--quiet", "--run-timeout", "1")
# A sender that judges a receiver fast: --timeout 1, one retry, so 2 s to give up.
QUICK = ("--timeout", "1", "--retries", "1", "--heartbeat-interval", "0.5", "--quiet")
TIMEOUT = 1.0  # the --timeout of QUICK


def log_time(line):
    """The log clock of a line, in seconds."""
    return datetime.strptime(line[:22], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_confirm_port_flag_reaches_a_receiver_on_another_port(procs):
    """Receiver and sender both given --confirm-port: confirmed; both [START] lines name it."""
    port = free_port()
    receiver = procs.receiver(*FAST_RECEIVER, "--confirm-port", str(port))
    sender = procs.sender("--confirm", "--confirm-port", str(port), "--workers", "2",
                          "--messages", "50", "--delay", "0", *QUICK,
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-3000:]
    assert sender.summary()["confirmed"] == 100
    # On a continuation line of the [START] line.
    continued = rf" - INFO    - {logs.CONTINUED}.*confirmations and"
    assert sender.lines(rf"{continued} reports from tcp://127\.0\.0\.1:{port}\b")
    assert receiver.lines(rf"{continued} run reports on tcp://127\.0\.0\.1:{port}\b")


def test_confirmations_that_never_come_are_said_and_given_up_on(procs):
    """A receiver on --confirm-port X, a sender listening on port + 1: said within about
    SERVER_TIMEOUT, naming the endpoint; then the sender gives up like on a down receiver."""
    receiver = procs.receiver(*FAST_RECEIVER, "--confirm-port", str(free_port()))
    expected = f"tcp://127.0.0.1:{receiver.port + 1}"
    sender = procs.sender("--confirm", "--workers", "2", "--messages", "20", "--delay", "0.05",
                          *QUICK, endpoints=[receiver.endpoint])
    assert sender.wait(30) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert result["confirmed"] == 0 and result["unconfirmed"] == 40, result
    said = sender.lines(rf"\[CONFIRM\] no confirmations from {re.escape(expected)} .*not"
                        " connected")
    assert said, sender.output()[-3000:]
    start = sender.lines(r"\[START\]")[0]
    assert log_time(said[0]) - log_time(start) < 2 * TIMEOUT, (start, said[0])
    assert sender.lines(r"\[CONFIRM\] .*giving up"), sender.output()[-3000:]
    assert "not connected" in result["receiver_report"]["reason"], result["receiver_report"]


class Forger(threading.Thread):
    """Binds the confirmation port (data port + 1) before the real receiver can, learns the
    topic from the sender's subscription, and publishes forged confirmations of every task."""

    def __init__(self, ctx, port, stop):
        super().__init__(name="forger", daemon=True)
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.stop = stop
        self.topics = []

    def run(self):
        with self.sock:
            while not self.stop.is_set():
                if self.sock.poll(20):
                    message = self.sock.recv()
                    if message[:1] == b"\x01":
                        self.topics.append(message[1:])
                for topic in self.topics:
                    everything = channel.CONFIRM_RANGE.pack(1, 0, 1000) + \
                        channel.CONFIRM_RANGE.pack(2, 0, 1000)
                    body = bytes([channel.Kind.CONFIRM]) + everything
                    for frames in ([topic, body, b"\0" * channel.MAC_SIZE], [topic, everything]):
                        self.sock.send_multipart(frames)


def test_a_forged_confirmation_confirms_nothing(procs):
    """A peer bound to the confirmation port sees only a derived topic and cannot forge:
    the sender confirms nothing, says why, and exits 1 (it once said 'confirmed 40/40')."""
    ctx = zmq.Context()
    stop = threading.Event()
    try:
        data_port = free_port()
        forger = Forger(ctx, data_port + 1, stop)
        forger.start()
        receiver = procs.receiver(*FAST_RECEIVER, "--confirm-port", str(free_port()),
                                  port=data_port)
        sender = procs.sender("--confirm", "--workers", "2", "--messages", "20", "--delay", "0",
                              *QUICK, endpoints=[receiver.endpoint])
        assert sender.wait(30) == 1, sender.output()[-3000:]
        result = sender.summary()
        assert result["confirmed"] == 0, result
        assert forger.topics and all(len(t) == channel.TOPIC_SIZE for t in forger.topics)
        run_id_low = bytes.fromhex(result["run_id"])
        assert all(run_id_low not in t for t in forger.topics), forger.topics
        assert sender.lines(r"\[CONFIRM\] .*not sealed for this run"), sender.output()[-3000:]
        assert not sender.lines(r"confirmed +40/40")
        # The real receiver did process the run: only the confirmations were forged.
        receiver.wait_for_output(rf"\[RUN\] run {result['run_id']} \| received 40/40")
    finally:
        stop.set()
        forger.join(5)
        ctx.destroy(linger=0)


def test_the_receivers_report_is_in_the_senders_summary(procs):
    """Plain mode: the summary's receiver row and receiver_report agree with the [RUN] line."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "3", "--messages", "100", "--delay", "0", *QUICK,
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-3000:]
    report = sender.summary()["receiver_report"]
    assert report["receivers"] == 1 and report["received"] == 300, report
    assert report["missing"] == 0 and report["duplicates"] == 0, report
    p99 = report["latency_ms"]["p99"]
    assert sender.lines(rf"receiver +300/300 received, missing 0, duplicates 0, p99 {p99:.2f} ms")
    receiver.wait_for_output(rf"\[RUN\] run {sender.summary()['run_id']} ")
    # The [RUN] line's latency, on its continuation line (the only run here).
    assert receiver.lines(rf" - INFO    - {logs.CONTINUED}.*latency p50 .* p99 {p99:.2f} ms "), \
        receiver.output()[-3000:]


LATE_SUBSCRIBER_WAIT = 20.0  # seconds the late SUB waits for a report (repeated every 0.05 s)


def first_report(sub, seal, within):
    """The first message on `sub` that opens as a REPORT of `seal`'s run: (instance id,
    runs[] entry); None if none came within `within` seconds."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1):
            opened = seal.open(sub.recv_multipart())
            if opened and opened[0] is channel.Kind.REPORT:
                payload = opened[1]
                return (payload[:channel.RECEIVER_ID_SIZE],
                        json.loads(payload[channel.RECEIVER_ID_SIZE:]))
    return None


def test_a_subscription_made_after_the_run_ended_still_hears_its_report(procs):
    """PUB drops what no subscription asked for yet, and a sender's subscription can reach
    a busy receiver after a short run ended (test_multi's partial-report gate test missed
    the report once in 7 loaded runs): the receiver repeats each run's report for
    REPORT_REPEAT_S. A SUB that subscribes only once the [RUN] line is logged hears it."""
    receiver = procs.receiver(*FAST_RECEIVER)
    name = uuid.uuid4().hex  # a shared run's id is known to all, this test too
    seal = channel.RunSeal(instances.wire_run_id(name))
    sender = procs.sender("--processes", "2", "--run-id", name, "--workers", "1",
                          "--messages", "10", "--delay", "0", *QUICK,
                          endpoints=[receiver.endpoint])
    receiver.wait_for_output(rf"\[RUN\] run {wire.run_label(instances.wire_run_id(name))} ")
    with zmq.Context() as ctx, ctx.socket(zmq.SUB) as sub:
        sub.linger = 0
        sub.subscribe(seal.topic)
        sub.connect(f"tcp://127.0.0.1:{receiver.port + 1}")
        heard = first_report(sub, seal, LATE_SUBSCRIBER_WAIT)
    assert heard is not None, receiver.output()[-3000:]
    assert len(heard[0]) == channel.RECEIVER_ID_SIZE
    assert heard[1]["planned"] == 20 and heard[1]["received"] == 20, heard
    assert sender.wait(30) == 0, sender.output()[-3000:]
    report = sender.summary()["receiver_report"]
    assert report["receivers"] == 1 and report["received"] == 20, report


def test_two_receivers_reports_are_merged(procs):
    """Each receiver holds a share of the run: the shares add up to the planned count."""
    first, second = procs.receiver(*FAST_RECEIVER), procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "4", "--messages", "50", "--delay", "0.002", *QUICK,
                          endpoints=[first.endpoint, second.endpoint])
    assert sender.wait(30) == 0, sender.output()[-3000:]
    report = sender.summary()["receiver_report"]
    assert report["receivers"] == 2 and report["of"] == 2, report
    assert report["received"] == 200 and report["missing"] == 0, report
    assert sorted(r["received"] for r in report["reports"]) != [0, 200], report
    assert sender.lines(r"  receiver +200/200 received, .*\(from 2 receivers\)")


def gates(sender):
    """The sender's JSON gates, by name."""
    return {g["name"]: g for g in sender.summary()["gates"]}


def test_gates_pass(procs):
    """Both gates within their limits: exit 0, each [GATE] line says passed."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "2", "--messages", "50", "--delay", "0", *QUICK,
                          "--max-loss", "0", "--max-p99", "60000", endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-3000:]
    got = gates(sender)
    assert got["max-loss"] == {"name": "max-loss", "limit": 0.0, "value": 0.0, "passed": True}
    assert got["max-p99"]["passed"] and 0 <= got["max-p99"]["value"] <= 60000, got
    assert len(sender.lines(r"\[GATE\] max-(loss|p99) passed: limit")) == 2


def test_max_p99_gate_fails(procs):
    """A p99 over its limit: exit 1, a [GATE] line with the limit and the value."""
    receiver = procs.receiver(*FAST_RECEIVER)
    sender = procs.sender("--workers", "2", "--messages", "50", "--delay", "0", *QUICK,
                          "--max-p99", "0.000001", endpoints=[receiver.endpoint])
    assert sender.wait(30) == 1, sender.output()[-3000:]
    got = gates(sender)["max-p99"]
    assert got["passed"] is False and got["value"] > got["limit"], got
    assert sender.lines(r"\[GATE\] max-p99 FAILED: limit 1e-06 ms, value [0-9.]+ ms")
    assert sender.lines(r"\[EXIT\] gate failed: max-p99")


def test_max_loss_gate_fails_when_a_restarted_receiver_misses_part_of_the_run(procs):
    """Receiver killed mid-run and restarted: the new one reports what it missed; the
    subscription follows the restart; the loss gate fails with its value."""
    first = procs.receiver(*FAST_RECEIVER, "--stats-interval", "0.1")
    sender = procs.sender("--workers", "2", "--messages", "200", "--delay", "0.01",
                          "--timeout", "3", "--retries", "2", "--heartbeat-interval", "0.5",
                          "--quiet", "--max-loss", "1", endpoints=[first.endpoint])
    wait_until(lambda: first.lines(r"\[STATS\] received [1-9]\d+"), 20, "the first receiver's"
               " first tens of messages")
    first.signal(signal.SIGKILL)
    first.wait(10)
    sender.wait_for_output(r"\[HEARTBEAT\] receiver .* down")
    procs.receiver(*FAST_RECEIVER, port=first.port)
    assert sender.wait(40) == 1, sender.output()[-3000:]
    result = sender.summary()
    report = result["receiver_report"]
    assert report["receivers"] == 1 and 0 < report["received"] < 400, report
    got = gates(sender)["max-loss"]
    assert got["passed"] is False and got["value"] > 1, got
    assert got["value"] == round(100 * (400 - report["received"]) / 400, 4), (got, report)
    assert sender.lines(rf"\[GATE\] max-loss FAILED: limit 1 %, value {got['value']:g} %")


def test_no_report_fails_the_gates_with_the_reason(procs):
    """The receiver publishes on another port: no report, so each gate fails, saying why."""
    receiver = procs.receiver(*FAST_RECEIVER, "--confirm-port", str(free_port()))
    sender = procs.sender("--workers", "2", "--messages", "5", "--delay", "0", *QUICK,
                          "--max-loss", "50", "--max-p99", "1000", "--report-timeout", "1",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert result["sent"] == 10 and result["receiver_report"]["receivers"] == 0, result
    for got in gates(sender).values():
        assert got["passed"] is False and got["value"] is None, got
        assert "not connected" in got["reason"], got
    assert len(sender.lines(r"\[GATE\] max-(loss|p99) FAILED: .*no value: no report: .*not"
                            " connected")) == 2
    assert sender.lines(r"  receiver +no report: tcp://127\.0\.0\.1:\d+ not connected")


class LyingReceiver(threading.Thread):
    """A peer that holds the run's data (so it can seal for the run): it takes the frames on
    its PULL port, and once every worker's END came, publishes `reports` (a list of
    (instance id, runs[] entry)) on its confirmation port, again every 0.2 s."""

    def __init__(self, ctx, port, reports, stop):
        super().__init__(name="liar", daemon=True)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(f"tcp://127.0.0.1:{port}")
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{port + 1}")
        self.reports = reports
        self.stop = stop

    def run(self):
        run_cache, ends, run = {}, set(), None
        with self.pull, self.pub:
            while not self.stop.is_set():
                if self.pull.poll(50):
                    msg = wire.decode(self.pull.recv(), run_cache)
                    run = msg[wire.RUN]
                    if msg[wire.KIND] == wire.END:
                        ends.add(msg[wire.WORKER])
                if run is not None and len(ends) == run.workers:
                    seal = channel.RunSeal(run.run_id)
                    for instance, entry in self.reports:
                        self.pub.send_multipart(seal.seal(
                            channel.Kind.REPORT, instance + json.dumps(entry).encode()))
                    self.stop.wait(0.2)


LIES = {  # issue 20, case 6: reports a sender must not believe, and what it then says
    "more_than_sent": ([(b"A" * 8, {"planned": 20, "received": 1000000, "duplicates": 0})],
                       "refused_reports"),
    "another_plan": ([(b"A" * 8, {"planned": 999, "received": 20, "duplicates": 0})],
                     "refused_reports"),
    # The last instance's report ends the sender's wait (its count is all that was sent),
    # so the three before it have arrived by then, in order, on the same connection.
    "four_instances": ([(bytes([n]) * 8, {"planned": 20, "received": 5 if n < 3 else 20,
                                          "duplicates": 0}) for n in range(4)],
                       "replaced_reports"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_report_that_cannot_be_true_is_named_and_not_counted(procs, lie):
    """Issue 20, case 6: a report claiming more received than sent, or another run's plan,
    is refused; four instances at one endpoint count as one (the last, replacing the
    others, whose parts stay at risk). Each is named in the summary, and the run exits 1
    (it once exited 0: 'received 1000000', or '(from 4 receivers)')."""
    reports, key = LIES[lie]
    ctx = zmq.Context()
    stop = threading.Event()
    port = free_port()
    liar = LyingReceiver(ctx, port, reports, stop)
    liar.start()
    try:
        sender = procs.sender("--workers", "2", "--messages", "10", "--delay", "0",
                              "--report-timeout", "3", *QUICK,
                              endpoints=[f"tcp://127.0.0.1:{port}"])
        assert sender.wait(30) == 1, sender.output()[-3000:]
        result = sender.summary()
        named = result["receiver_report"][key]
        assert len(named) == len(reports) - (key == "replaced_reports"), result
        assert result["at_risk"] == 20 and not result["at_risk_exact"], result
        assert sender.lines(r"(refused|replaced) report +tcp://127\.0\.0\.1"), \
            sender.output()[-3000:]
        assert not sender.lines(r"from 4 receivers")
    finally:
        stop.set()
        liar.join(5)
        ctx.destroy(linger=0)


def test_tasks_processed_by_two_receivers_are_counted_as_duplicates(procs):
    """Issue 20, case 3: under --confirm, one of two receivers hangs (SIGSTOP) long enough
    to be called down: its unconfirmed tasks are resent to the other, and once resumed it
    processes the ones it held too. Neither receiver sees a duplicate; the sender's
    summary counts them, at least Σ received - sent, and says where they come from."""
    steady = procs.receiver(*FAST_RECEIVER)
    hung = procs.receiver("--processing-time", "0", "--no-file-log", "--run-timeout", "20")
    sender = procs.sender("--confirm", "--workers", "2", "--messages", "600", "--delay",
                          "0.005", "--timeout", "5", "--heartbeat-interval", "0.5", "--quiet",
                          "--report-timeout", "20", endpoints=[steady.endpoint, hung.endpoint])
    wait_until(lambda: len(hung.lines(r"\[MSG #")) >= 50, 20, "50 messages on the one to hang")
    hung.signal(signal.SIGSTOP)
    try:
        sender.wait_for_output(rf"\[HEARTBEAT\] receiver {re.escape(hung.endpoint)} down")
        sender.wait_for_output(r"\[RESEND\]")
    finally:
        hung.signal(signal.SIGCONT)
    assert sender.wait(60) == 0, sender.output()[-3000:]
    result = sender.summary()
    report = result["receiver_report"]
    assert result["confirmed"] == 1200 and report["receivers"] == 2, report
    across = report["received"] - 1200
    assert across > 0, report  # the hung one processed what it held before the resend
    assert report["duplicates_across"] == across and report["duplicates"] >= across, report
    assert sender.lines(rf"duplicates {report['duplicates']} \({across} at least across"
                        r" receivers: --confirm resends processed by two\)")


def test_confirmations_get_at_most_the_confirm_timeout(procs):
    """Issue 20, case 7: a receiver that stays connected but does not confirm (each task's
    work takes 5 s) no longer keeps the sender resending at every --timeout until it has
    done them all: --confirm-timeout after each worker's last send the run ends, exit 1,
    the unconfirmed tasks listed as ranges."""
    stuck = procs.receiver("--processing-time", "5", "--no-file-log", "--quiet")
    sender = procs.sender("--confirm", "--workers", "2", "--messages", "5", "--delay", "0",
                          "--timeout", "1", "--retries", "5", "--confirm-timeout", "2",
                          "--heartbeat-interval", "0.5", "--quiet", "--report-timeout", "0",
                          endpoints=[stuck.endpoint])
    assert sender.wait(25) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert result["confirmed"] == 0 and result["unconfirmed"] == 10, result
    assert result["unconfirmed_ranges"] == {"Pusher-1": ["0-4"], "Pusher-2": ["0-4"]}, result
    assert len(sender.lines(r"\[FAIL\] Pusher-\d gives up: 5 messages unconfirmed 2 s after"
                            r" its last send \(--confirm-timeout\)")) == 2
    assert sender.lines(r"  Pusher-1 +tasks 0-4$")
