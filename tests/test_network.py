"""The pair across a routed network: silent partitions (one of two receivers, a cut in a
run's last second, a run reported incomplete then complete), a silently dead host, a slow
link, TCP keepalive.

Sender and receivers run in separate network namespaces joined by a router namespace
(tests/netns.py), so a failure can be silent as it is across machines: no FIN, RST or
ICMP reaches the sender. Skipped, with the reason, where namespaces cannot be made.
"""

import re
import signal
import time

import pytest

from conftest import free_port, wait_until
from pushpull import sendflow
from netns import RECEIVER_PORT, network  # noqa: F401  (the fixture, used by name)

RECEIVER_BASE = ("--processing-time", "0", "--no-file-log", "--quiet")
RECEIVER_ARGS = (*RECEIVER_BASE, "--run-timeout", "1")
# Through a cut a run stays open, for one [RUN] line at its end (with --run-timeout 1 a
# cut gets it reported incomplete first, then again once complete: see below).
PATIENT_RECEIVER = (*RECEIVER_BASE, "--run-timeout", "20")
HEARTBEAT = 0.5  # --heartbeat-interval of the senders here: a cut is seen within about 1 s
CLOSED_PORT = 5999  # nothing listens there on any host
SLOW_RATE_BITS = 10_000_000  # the slow link's rate, bit/s
SLOW_RATE = "10mbit"
# A receiver down 1 s x (1 + 1 retry) = 2 s is given up on: the far end of a pause; a
# cut-off receiver's report of the run never comes, so the sender waits 1 s, not 5.
GIVE_UP = ("--timeout", "1", "--retries", "1", "--report-timeout", "1")
# Messages of 10 kB and a queue of 20: a connection holds at most CONNECTION_HOLDS of
# them, so few that `at_risk` (at most that per worker) tells something.
SMALL_BUFFERS = ("--hwm", "20", "--size", "10000")
CONNECTION_HOLDS = sendflow.in_flight_bound(10000, 20, 200, 65536, 65536)  # RECEIVE_HWM 200


def received_by(receiver):
    """Warm-stop a receiver and return how many messages it received."""
    assert receiver.stop() == 0, receiver.output()[-2000:]
    return receiver.summary()["received"]


def sent_so_far(sender):
    """Messages the sender has sent, from its [STATS] lines (0 before the first)."""
    hits = sender.lines(r"\[STATS\] sent \d+")
    return int(re.search(r"sent (\d+)", hits[-1])[1]) if hits else 0


def heartbeat_lines(sender, word):
    """The sender's [HEARTBEAT] lines that say `word` (down / up)."""
    return sender.lines(rf"\[HEARTBEAT\] .* {word}\b")


def paced_sender(net, workers, messages, delay, *extra):
    """A quiet sender to every receiver host, with a fast heartbeat and [STATS] lines."""
    return net.sender("--workers", str(workers), "--messages", str(messages),
                      "--delay", str(delay), "--heartbeat-interval", str(HEARTBEAT),
                      "--stats-interval", "0.2", "--quiet", *extra)


def run_line(receiver, run_id):
    """The receiver's [RUN] line for `run_id`, once it is printed."""
    return receiver.wait_for_output(rf"\[RUN\] run {run_id} \|", timeout=15)[0]


def test_partition_drops_packets_silently_and_heals(network):
    """The harness itself: a cut host's closed port neither refuses nor fails, it is silent."""
    net = network()
    host = net.receiver_hosts[0]
    assert net.tcp_probe(host, CLOSED_PORT) == "refused"  # the route works: an RST came back
    net.partition(host)
    assert net.tcp_probe(host, CLOSED_PORT) == "timeout"  # no RST, no ICMP error
    net.heal(host)
    assert net.tcp_probe(host, CLOSED_PORT) == "refused"


def test_paced_run_across_the_router_reaches_both_receivers(network):
    """Two receiver hosts behind the router: exit 0, and their shares add up to planned."""
    net = network(receivers=2)
    receivers = [net.receiver(*RECEIVER_ARGS, host=host) for host in net.receiver_hosts]
    sender = paced_sender(net, 4, 50, 0.01)
    assert sender.wait(30) == 0, sender.output()[-2000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 200 and result["flush_complete"], result
    shares = [int(re.search(r"received (\d+) of 200", run_line(r, result["run_id"]))[1])
              for r in receivers]
    assert sum(shares) == 200 and min(shares) > 0, shares


def test_short_silent_partition_is_seen_and_loses_nothing(network):
    """Cut mid-run, healed once the heartbeat says down (far within timeout x (1 + retries)
    = 9 s): down after the cut, up after the heal, exit 0, every message received."""
    net = network()
    host = net.receiver_hosts[0]
    receiver = net.receiver(*PATIENT_RECEIVER)
    # After a lapse only the receiver's report can say nothing was lost (issue 20): wait
    # for it as long as TCP's resends after the heal may take on a loaded machine.
    sender = paced_sender(net, 3, 100, 0.02, "--report-timeout", "20")
    wait_until(lambda: sent_so_far(sender) >= 30, 15, "30 messages sent")
    assert not heartbeat_lines(sender, "down"), sender.output()[-2000:]
    net.partition(host)
    try:
        sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
        ups_before_heal = len(heartbeat_lines(sender, "up"))
    finally:
        net.heal(host)
    sender.wait_for_output(r"\[HEARTBEAT\] .* up\b", timeout=15, count=ups_before_heal + 1)
    assert sender.wait(30) == 0, sender.output()[-2000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 300 and result["flush_complete"], result
    assert result["at_risk"] == 0, result
    assert result["receiver_down_events"] >= 1, result
    line = run_line(receiver, result["run_id"])
    assert "received 300/300" in line and "missing 0" in line, line


def test_silently_dead_host_is_seen_down_with_its_connections_half_open(network):
    """kill_host: the heartbeat reports the receiver down while the sender's data
    connections are still open (no FIN or RST reached it: the death was silent)."""
    net = network()
    host = net.receiver_hosts[0]
    net.receiver(*RECEIVER_ARGS)
    sender = paced_sender(net, 2, 1000, 0.02)
    wait_until(lambda: sent_so_far(sender) >= 20, 15, "20 messages sent")
    assert net.established(host) == 4  # two workers, the heartbeat probe, the confirmation SUB
    assert not heartbeat_lines(sender, "down"), sender.output()[-2000:]
    net.kill_host(host)
    sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
    # The probe gave up on missing heartbeats; the workers' connections carry none, and
    # keep them (paused): still open, so no FIN or RST arrived.
    assert net.established(host) >= 2, net.run(net.sender_host, "ss", "-tn").stdout
    # What plain mode does next: test_permanent_silent_partition_... below.


def test_slow_link_delivers_everything_as_backpressure_not_down(network):
    """10 Mbit/s toward the receiver: 2 MB take their time, exit 0, all received, and the
    heartbeat never mistakes the slow link for a dead receiver."""
    net = network()
    net.slow_link(net.receiver_hosts[0], SLOW_RATE)
    receiver = net.receiver(*RECEIVER_ARGS)
    workers, messages, size = 4, 50, 10_000
    started = time.monotonic()
    sender = paced_sender(net, workers, messages, 0, "--size", str(size))
    assert sender.wait(30) == 0, sender.output()[-2000:]
    result = sender.summary()
    line = run_line(receiver, result["run_id"])
    took = time.monotonic() - started
    planned = workers * messages
    assert result["sent"] == planned and f"received {planned}/{planned}" in line, line
    assert not heartbeat_lines(sender, "down"), sender.output()[-2000:]
    # Every byte crossed the slow link: a lower bound that load cannot break.
    assert took >= 0.9 * planned * size * 8 / SLOW_RATE_BITS, f"{took:.2f} s: not slowed"


def test_permanent_silent_partition_pauses_gives_up_and_counts_at_risk(network):
    """Cut for good mid-run (5 x 400, --delay 0.025): the workers pause when the heartbeat
    calls the receiver down, give up after timeout x (1 + retries), and exit 1; what the
    receiver missed of what was sent is at most `at_risk`."""
    net = network()
    receiver = net.receiver(*PATIENT_RECEIVER)
    sender = paced_sender(net, 5, 400, 0.025, *GIVE_UP)
    wait_until(lambda: sent_so_far(sender) >= 200, 15, "200 messages sent")
    net.partition(net.receiver_hosts[0])
    assert sender.wait(30) == 1, sender.output()[-2000:]
    result = sender.summary()
    sent, planned = result["sent"], result["planned"]
    assert 200 <= sent < planned == 2000, result
    assert result["failed_by_reason"]["receiver_down"] == planned - sent, result
    assert 0 < result["at_risk"] <= sent, result
    # In order: the verdict, the pause, the give-up.
    output = sender.output()
    down = output.index("[HEARTBEAT]")
    assert down < output.index("paused: receiver is down") < output.index("gives up"), output
    received = received_by(receiver)
    assert sent - result["at_risk"] <= received <= sent, (received, result)


def sent_after(sender, pattern, skip=1):
    """What the sender had sent by a [STATS] line computed after the first line matching
    `pattern` was logged: the (1 + skip)-th [STATS] line after it (the first may have been
    computed before, and logged after)."""
    lines = sender.output().splitlines()
    first = next(i for i, line in enumerate(lines) if re.search(pattern, line))
    stats = [line for line in lines[first + 1:] if "[STATS] sent" in line]
    return int(re.search(r"sent (\d+)", stats[skip])[1])


def test_one_of_two_receivers_silently_gone_gets_nothing_after_the_verdict(network):
    """Two receivers, one cut off for good mid-run: once the heartbeat calls it down the
    workers drop it, so every later message goes to the live one; the run exits 1 with
    what the silent one may have lost counted `at_risk`, at most what was sent before
    the verdict (a queue of 1000 per connection would have taken far more)."""
    net = network(receivers=2)
    live, silent = [net.receiver(*PATIENT_RECEIVER, host=host) for host in net.receiver_hosts]
    sender = paced_sender(net, 4, 400, 0.01, *GIVE_UP)
    wait_until(lambda: sent_so_far(sender) >= 200, 15, "200 messages sent")
    gone = net.receiver_hosts[1]
    net.partition(gone)
    assert sender.wait(30) == 1, sender.output()[-2000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 1600, result
    assert heartbeat_lines(sender, "down") == sender.lines(rf"{gone.addr}.* down\b")
    before_verdict = sent_after(sender, rf"\[HEARTBEAT\] .*{gone.addr}.* down\b")
    assert before_verdict < 1400, "the verdict came too late to tell"
    # Each worker drops the silent receiver before its first send after the verdict.
    assert 0 < result["at_risk"] <= before_verdict and not result["at_risk_exact"], result
    assert sender.lines(rf"\[EXIT\] up to {result['at_risk']} of 1600 sent messages may not"
                        rf" have arrived: {gone.endpoint()} went silent")
    got_live, got_silent = received_by(live), received_by(silent)
    assert got_live >= 1600 - before_verdict, (got_live, before_verdict)
    assert 1600 - result["at_risk"] <= got_live + got_silent <= 1600, (got_live, got_silent)


def test_one_of_two_receivers_cut_and_healed_gets_messages_again(network):
    """A cut of one of two receivers, healed: dropped at the verdict, connected again once
    it is up, it takes its share again. What the dropped connections held in the kernel
    is delivered after the heal; ZeroMQ discards what they held in their queues, and at
    this pace (small messages) the kernel took it all. Both receivers report the run, so
    the sender's verdict is theirs, exact: all 2000 received, at_risk 0, exit 0."""
    net = network(receivers=2)
    receivers = [net.receiver(*PATIENT_RECEIVER, host=host) for host in net.receiver_hosts]
    # A long run after the heal: the kernel resends the dropped connections' data (its
    # timer backed off during the cut) well before the last messages and END frames.
    sender = paced_sender(net, 4, 800, 0.01)
    wait_until(lambda: sent_so_far(sender) >= 200, 15, "200 messages sent")
    cut = net.receiver_hosts[1]
    net.partition(cut)
    try:
        sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
    finally:
        net.heal(cut)
    sender.wait_for_output(rf"\[HEARTBEAT\] .*{cut.addr}.* up\b", timeout=15, count=2)
    sent_at_heal = sent_so_far(sender)
    assert sent_at_heal < 2400, "the run nearly ended before the heal: no share left to take"
    status = sender.wait(30)
    result = sender.summary()
    shares = [received_by(r) for r in receivers]
    assert result["sent"] == result["planned"] == 3200, result
    assert result["receiver_report"]["receivers"] == 2, result["receiver_report"]
    assert result["at_risk_exact"] and result["at_risk"] == 3200 - sum(shares), (result, shares)
    assert status == 0 and sum(shares) == 3200, (status, shares, sender.output()[-2000:])
    assert shares[1] > 0.25 * (3200 - sent_at_heal), shares  # messages again after the heal


def test_cut_just_before_the_end_is_judged_after_the_heartbeat_could_see_it(network):
    """Cut a second before the last send, with --report-timeout 0: the last messages go into
    the kernel's buffer of a connection that leads nowhere, and the heartbeat's verdict
    (1.5 to 2.5 s after the cut at --heartbeat-interval 2) comes after the end of
    sending. The sender waits for it, and exits 1 with at_risk a true bound, not 0."""
    net = network()
    receiver = net.receiver(*PATIENT_RECEIVER)
    sender = net.sender("--workers", "1", "--messages", "300", "--delay", "0.01",
                        "--heartbeat-interval", "2", "--report-timeout", "0",
                        "--stats-interval", "0.2", "--quiet")
    wait_until(lambda: sent_so_far(sender) >= 200, 15, "200 messages sent")
    net.partition(net.receiver_hosts[0])
    assert sender.wait(30) == 1, sender.output()[-2000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 300, result  # no verdict while sending
    assert result["at_risk"] > 0 and not result["at_risk_exact"], result
    output = sender.output()
    waited = output.index("s more for the heartbeat")
    verdict = re.search(r"\[HEARTBEAT\] .* down\b", output).start()
    assert waited < verdict < output.index("[EXIT] up to"), output
    received = received_by(receiver)
    assert result["sent"] - result["at_risk"] <= received < result["sent"], (received, result)


def test_a_run_reported_incomplete_in_a_cut_is_reported_again_once_complete(network):
    """A cut longer than the receiver's --run-timeout that heals within the sender's
    window: the receiver reports the run incomplete, then, once TCP has delivered the
    rest after the heal, a second [RUN] line reports it complete; the sender's summary
    and the receiver's runs[] hold the final state, exit 0."""
    net = network()
    host = net.receiver_hosts[0]
    receiver = net.receiver(*RECEIVER_ARGS)  # --run-timeout 1
    sender = paced_sender(net, 2, 300, 0.01)
    wait_until(lambda: sent_so_far(sender) >= 100, 15, "100 messages sent")
    net.partition(host)
    try:
        first = receiver.wait_for_output(r"\[RUN\] run \w+ \|", timeout=15)[0]
    finally:
        net.heal(host)
    assert "WARNING" in first and "missing" in first and "missing 0" not in first, first
    assert sender.wait(30) == 0, sender.output()[-2000:]
    result = sender.summary()
    lines = receiver.wait_for_output(rf"\[RUN\] run {result['run_id']} \|", timeout=15, count=2)
    assert lines[0] == first, lines
    second = lines[1]
    assert "received 600/600 | missing 0" in second and "complete after all" in second, second
    assert result["receiver_report"]["received"] == 600 and result["at_risk_exact"], result
    assert receiver.stop() == 0
    (entry,) = receiver.summary()["runs"]
    assert entry["complete"] and entry["received"] == 600 and entry["missing"] == 0, entry


def test_localhost_endpoint_is_tracked_through_restarts(procs):
    """tcp://localhost:PORT as written: after a restart the heartbeat says up again, and a
    second kill is seen as a second down (loopback is enough: the name is the point)."""
    port = free_port()
    receiver = procs.receiver(*RECEIVER_BASE, port=port)
    sender = procs.sender("--workers", "2", "--messages", "2000", "--delay", "0.01",
                          "--heartbeat-interval", str(HEARTBEAT), "--timeout", "10",
                          "--quiet", endpoints=[f"tcp://localhost:{port}"])
    for restart in (1, 2):
        sender.wait_for_output(r"\[HEARTBEAT\] receiver tcp://localhost:\d+ up", count=restart)
        receiver.signal(signal.SIGKILL)
        receiver.wait(10)
        sender.wait_for_output(r"\[HEARTBEAT\] receiver tcp://localhost:\d+ down",
                               count=restart)
        receiver = procs.receiver(*RECEIVER_BASE, port=port)
    sender.wait_for_output(r"\[HEARTBEAT\] receiver tcp://localhost:\d+ up", count=3)
    assert sender.stop() == 130
    assert sender.summary()["receiver_down_events"] == 2


def test_data_connections_carry_tcp_keepalive(network):
    """Both ends turn TCP keepalive on (the sender's workers, probe and confirmation SUB,
    the receiver's PULL and PUB): a peer gone without a FIN is dropped by the kernel, not
    kept half-open."""
    net = network()
    host = net.receiver_hosts[0]
    net.receiver(*RECEIVER_ARGS)
    sender = paced_sender(net, 2, 1000, 0.05)
    wait_until(lambda: sent_so_far(sender) >= 10, 15, "10 messages sent")

    def keepalive_timers(on_host, peer):
        out = net.run(on_host, "ss", "-Htno", "state", "established", "dst", peer).stdout
        return [line for line in out.splitlines() if "keepalive" in line], out

    channel = f"{host.addr}:{RECEIVER_PORT + 1}"  # the confirmation channel's end

    def all_kept_alive(on_host, peer):
        # Two workers, the probe and the channel's SUB. A connection shows its keepalive
        # timer only while nothing it sent waits for an ACK (else: its retransmit timer),
        # and on a busy machine one may still be connecting: wait until all four show it.
        timers, _ = keepalive_timers(on_host, peer)
        return len(timers) >= 4 and any(channel in line for line in timers)

    wait_until(lambda: all_kept_alive(net.sender_host, host.addr), 20,
               "keepalive timers on the sender's 4 connections")
    wait_until(lambda: all_kept_alive(host, net.sender_host.addr), 20,
               "keepalive timers on the receiver's 4 connections")


@pytest.mark.parametrize("reborn_reports", [True, False], ids=["reported", "unreported"])
def test_a_receiver_host_that_crashes_and_comes_back_keeps_its_share_at_risk(network,
                                                                             reborn_reports):
    """Issue 20, cases 1 and 5: the receiver's host dies silently mid-run and comes back
    with a new receiver process before the verdict. What the dead process held, or its
    connections did, is lost; the new instance does not speak for the old one, whether
    it reports the run or not (its channel on another port): exit 1, not exact, and
    at_risk no more than the reports lack (case 4)."""
    net = network()
    host = net.receiver_hosts[0]
    net.receiver(*PATIENT_RECEIVER)
    sender = net.sender("--workers", "4", "--rate", "200", "--duration", "5",
                        "--heartbeat-interval", str(HEARTBEAT), "--timeout", "10",
                        "--stats-interval", "0.2", "--quiet")
    wait_until(lambda: sent_so_far(sender) >= 300, 15, "300 messages sent")
    net.kill_host(host)
    try:
        sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
    finally:
        net.heal(host)
    unheard = () if reborn_reports else ("--confirm-port", str(CLOSED_PORT))
    reborn = net.receiver(*PATIENT_RECEIVER, *unheard)
    assert sender.wait(40) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert result["sent"] == result["planned"] == 1000, result
    got = received_by(reborn)
    assert got < 1000, got  # the run lost messages: the dead process's, its connections'
    lacking = 1000 - got if reborn_reports else 1000
    assert 0 < result["at_risk"] <= lacking and not result["at_risk_exact"], result
    assert sender.lines(r"\[EXIT\] up to \d+ of 1000 sent messages may not have arrived")
