"""--confirm across a routed network: a permanent silent partition, a host that dies silently
and comes back, two receivers with one gone for good, a firewalled confirmation port.

Sender and receivers run in separate network namespaces (tests/netns.py): a failure is
silent as it is across machines. Skipped, with the reason, where namespaces cannot be made.
"""

import re
from datetime import datetime

from conftest import wait_until
from netns import RECEIVER_PORT, network  # noqa: F401  (the fixture, used by name)

RECEIVER_ARGS = ("--processing-time", "0", "--no-file-log", "--quiet", "--run-timeout", "30")
HEARTBEAT = 0.5  # --heartbeat-interval of the senders here: a silent receiver is seen in ~1 s


def confirmed_sender(net, workers, messages, delay, timeout, retries, endpoints=None):
    """A quiet --confirm sender, paced, with a fast heartbeat and [STATS] lines."""
    return net.sender("--confirm", "--workers", str(workers), "--messages", str(messages),
                      "--delay", str(delay), "--timeout", str(timeout), "--retries", str(retries),
                      "--heartbeat-interval", str(HEARTBEAT), "--stats-interval", "0.2",
                      "--quiet", endpoints=endpoints)


def sent_so_far(sender):
    """Messages the sender has sent, from its [STATS] lines (0 before the first)."""
    hits = sender.lines(r"\[STATS\] sent \d+")
    return int(re.search(r"sent (\d+)", hits[-1])[1]) if hits else 0


def test_confirm_gives_up_under_a_permanent_partition(network):
    """Cut for good mid-run: the sender gives up as on a down receiver (SERVER_TIMEOUT x
    (1 + retries) after the heartbeat saw it), exit 1, the unconfirmed tasks listed."""
    net = network()
    net.receiver(*RECEIVER_ARGS)
    sender = confirmed_sender(net, 2, 400, 0.02, timeout=1, retries=1)
    wait_until(lambda: sent_so_far(sender) >= 40, 15, "40 messages sent")
    net.partition(net.receiver_hosts[0])
    sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
    # The give-up takes 2 s after the verdict; 20 s is far more, and far less than never.
    assert sender.wait(20) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert 0 < result["confirmed"] < 800 and result["unconfirmed"] == 800 - result["confirmed"]
    assert result["unconfirmed_tasks"], result
    assert sender.lines(r"\[FAIL\] Pusher-\d+ gives up"), sender.output()[-3000:]


def test_confirm_survives_a_silent_host_restart(network):
    """The receiver's host dies silently and comes back with a new receiver: the workers and
    the confirmation subscription reconnect, the run completes, exit 0, all confirmed."""
    net = network()
    host = net.receiver_hosts[0]
    net.receiver(*RECEIVER_ARGS)
    sender = confirmed_sender(net, 2, 300, 0.02, timeout=4, retries=3)
    wait_until(lambda: sent_so_far(sender) >= 40, 15, "40 messages sent")
    net.kill_host(host)
    sender.wait_for_output(r"\[HEARTBEAT\] .* down\b", timeout=10)
    net.heal(host)
    second = net.receiver(*RECEIVER_ARGS)
    assert sender.wait(40) == 0, sender.output()[-3000:]
    result = sender.summary()
    assert result["confirmed"] == 600 and result["resent"] > 0, result
    run = second.wait_for_output(rf"\[RUN\] run {result['run_id']} \|", timeout=15)[0]
    assert "received" in run, run
    report = result["receiver_report"]
    assert report["receivers"] == 1, report  # the new receiver's report reached the sender


def test_a_dead_receivers_work_moves_to_the_live_one_in_one_resend_round(network):
    """Two receivers, one host gone for good: each worker resends its unconfirmed messages
    once, to the live receiver; no round deals them back into the dead connection."""
    net = network(receivers=2)
    for host in net.receiver_hosts:
        net.receiver(*RECEIVER_ARGS, host=host)
    sender = confirmed_sender(net, 2, 300, 0.02, timeout=2, retries=2)
    wait_until(lambda: sent_so_far(sender) >= 60, 15, "60 messages sent")
    net.kill_host(net.receiver_hosts[1])
    assert sender.wait(40) == 0, sender.output()[-3000:]
    result = sender.summary()
    assert result["confirmed"] == 600, result
    rounds = sender.lines(r"\[RESEND\] Pusher-\d+: ")
    per_worker = [len([r for r in rounds if f"Pusher-{n}:" in r]) for n in (1, 2)]
    assert max(per_worker) <= 1, rounds
    assert not sender.lines(r"\[RESEND\] .*confirmations stalled"), rounds


def logged_at(line):
    """The time of a log line, in seconds."""
    return datetime.strptime(line[:22], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_a_firewalled_confirmation_port_is_named_and_given_up_on(network):
    """A firewall that lets the data port through and silently drops the confirmation port:
    --confirm says within about SERVER_TIMEOUT that no confirmations come from that
    endpoint, not connected, naming the firewall; it gives up after timeout x (1 +
    retries), exit 1. A plain run delivers everything and says why no report came."""
    net = network()
    host = net.receiver_hosts[0]
    net.receiver(*RECEIVER_ARGS)
    channel = host.endpoint(RECEIVER_PORT + 1)
    net.firewall(host, RECEIVER_PORT + 1)
    assert net.tcp_probe(host, RECEIVER_PORT + 1) == "timeout"  # dropped: no RST, no ICMP
    assert net.tcp_probe(host, RECEIVER_PORT) == "connected"
    sender = confirmed_sender(net, 2, 20, 0.05, timeout=1, retries=1)
    assert sender.wait(30) == 1, sender.output()[-3000:]
    result = sender.summary()
    assert result["confirmed"] == 0 and result["unconfirmed"] == 40, result
    said = sender.lines(rf"\[CONFIRM\] no confirmations from {re.escape(channel)} .*not"
                        r" connected: .*firewalled")
    assert said, sender.output()[-3000:]
    started = logged_at(sender.lines(r"\[START\]")[0])
    assert logged_at(said[0]) - started < 2 * 1, said[0]  # SERVER_TIMEOUT (1 s) and slack
    assert sender.lines(r"\[CONFIRM\] .*giving up"), sender.output()[-3000:]
    plain = net.sender("--workers", "2", "--messages", "20", "--delay", "0.01", "--quiet",
                       "--heartbeat-interval", str(HEARTBEAT), "--report-timeout", "1")
    assert plain.wait(30) == 0, plain.output()[-3000:]
    report = plain.summary()["receiver_report"]
    assert report["receivers"] == 0 and f"{channel} not connected" in report["reason"], report
