"""The sender's side of the confirmation channel: the listener thread and what it learned.

One SUB per receiver, subscribed to the run's topic (pushpull/channel.py: the
format); confirmations go to the workers' windows (pushpull/windows.py), reports
wait for main.
"""

import threading
import time
from dataclasses import dataclass, field

import zmq

from pushpull import verdict
from pushpull.channel import (RECEIVER_ID_SIZE, Kind, RunSeal, confirm_endpoint,
                              decode_confirmations)
from pushpull.health import MONITOR_EVENTS, monitor_event, set_heartbeats
from pushpull.links import set_link_options
from pushpull.push import Outcome
from pushpull.threads import POLL_INTERVAL, POLL_S, ServiceThread

# What a sender's confirmation SUB holds, at most CHANNEL_RECEIVE_HWM x CHANNEL_MAX_BYTES
# (16 MiB) per channel, whatever a peer on that port sends: a REPORT is at most
# verdict.REPORT_MAX_BYTES, a CONFIRM 12 bytes a range of tasks processed in one
# CONFIRM_INTERVAL (87,000 ranges: more than a receiver processes in 50 ms).
CHANNEL_MAX_BYTES = 1024 * 1024  # bytes: a larger message drops the peer (ZMQ_MAXMSGSIZE)
CHANNEL_RECEIVE_HWM = 16  # messages the SUB may hold unread per channel (ZMQ_RCVHWM)
REPORTS_PER_SOURCE = 4  # receiver instances (restarts) whose reports one channel keeps


@dataclass
class ChannelSource:
    """One receiver's confirmation channel, as the sender's listener sees it."""

    endpoint: str  # where the receiver publishes (confirm_endpoint of data_endpoint)
    data_endpoint: str  # the receiver's data endpoint, as the user wrote it
    connected: bool = False
    settled: bool = False  # connected once, or refused once: the run's start need not wait
    authentic: int = 0  # messages sealed for this run
    dropped: int = 0  # messages not sealed for this run (forged, or another run's)
    last_authentic: float = 0.0  # monotonic time of the last one
    warnings: int = 0  # SERVER_TIMEOUTs of silence said so far, in this silence
    gave_up: bool = False
    # receiver instance id -> runs[] entry, in the order the instances first reported: the
    # last is the current instance; the ones before it were replaced (a restart)
    reports: dict = field(default_factory=dict)
    reported_at: float = 0.0  # monotonic time its latest report arrived (--find-max's drain)

    def current(self):
        """(instance id, runs[] entry) of the instance that reported last, or None."""
        if not self.reports:
            return None
        instance = next(reversed(self.reports))
        return instance, self.reports[instance]

    def replaced(self):
        """[(instance id, runs[] entry)] of the instances a later one replaced (kept ones)."""
        return list(self.reports.items())[:-1]

    def why_silent(self):
        """A short guess at why nothing arrives from this channel."""
        if not self.connected:
            return ("not connected: is the receiver's confirmation port another one"
                    " (--confirm-port), or is the port firewalled?")
        if self.dropped:
            return (f"connected, but {self.dropped} messages were not sealed for this run:"
                    " is another program bound to that port?")
        if self.authentic:
            return "connected; the receiver is slow or stopped processing"
        return "connected, but the publisher never spoke for this run: is it our receiver?"


class ConfirmChannel:
    """The sender's side of one run's confirmation channel: what the listener learned.

    Written by the listener thread; main waits on it for the receivers' reports.
    """

    def __init__(self, run_id, data_endpoints, port, confirmations, timeout, retries):
        self.seal = RunSeal(run_id)
        self.confirmations = confirmations  # None in plain mode: reports only
        self.timeout = timeout
        self.retries = retries
        self.sources = []
        self.unreachable = []  # data endpoints with no confirmation channel (ipc://)
        for data_endpoint in data_endpoints:
            try:
                self.sources.append(ChannelSource(confirm_endpoint(data_endpoint, port),
                                                  data_endpoint))
            except ValueError:
                self.unreachable.append(data_endpoint)
        self.changed = threading.Condition()
        self._pending_since = None  # when the windows last went from empty to not

    def describe(self):
        """The confirmation endpoints, for the [START] line."""
        return ", ".join([s.endpoint for s in self.sources]
                         + [f"none for {ep}" for ep in self.unreachable])

    def wait_settled(self, within, stop):
        """Wait (at most `within` s) until each channel connected or was refused once.

        A subscription made before the run starts hears the run's report when it is first
        published; one that reaches the receiver later hears a repeat (REPORT_REPEAT_S).
        """
        self._wait(lambda: all(s.settled for s in self.sources), within, stop)

    def all_reported(self):
        """True when every receiver's channel brought a report of the run."""
        with self.changed:
            return not self.unreachable and all(s.reports for s in self.sources)

    def collected(self):
        """(each source's (data endpoint, current report or None, replaced reports),
        all_reported()), at one moment."""
        with self.changed:
            return ([(s.data_endpoint, s.current(), s.replaced()) for s in self.sources],
                    self.all_reported())

    def wait_for_reports(self, within, stop, sent=0):
        """Wait (at most `within` s) until every channel brought a report, and together
        they count at least `sent` messages received.

        A receiver that reported the run incomplete (its sender fell silent past
        --run-timeout, or data came late over a healed connection) reports it again
        once it completes; that later report supersedes the first.
        """
        self._wait(lambda: all(s.reports for s in self.sources)
                   and self._received() >= sent, within, stop)

    def _received(self):
        """Messages of the run received, by the reports so far (the lock held)."""
        return sum(verdict.arrived(s.current()[1]) for s in self.sources
                   if s.reports)

    def _wait(self, done, within, stop):
        """Wait until done() is true, `within` seconds pass, or `stop` is set."""
        deadline = time.monotonic() + within
        with self.changed:
            while not done() and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(min(left, POLL_S))

    def why_no_report(self):
        """Why no receiver's report arrived, in a few words."""
        reasons = [f"{ep} has no confirmation channel (not tcp://, or port 65535)"
                   for ep in self.unreachable]
        for source in self.sources:
            if source.reports:
                continue
            if not source.connected:
                reasons.append(f"{source.endpoint} not connected")
            elif source.dropped and not source.authentic:
                reasons.append(f"{source.endpoint} sent {source.dropped} messages not sealed"
                               " for this run")
            else:
                reasons.append(f"{source.endpoint} connected, but the receiver had not"
                               " reported the run (still processing? see its [RUN] line)")
        return "; ".join(reasons)

    def on_message(self, source, frames, log):
        """Apply one message from `source`'s channel; what is not sealed for the run is dropped."""
        opened = self.seal.open(frames)
        if opened is None:
            source.dropped += 1
            return
        kind, payload = opened
        with self.changed:
            source.authentic += 1
            if kind is Kind.REPORT and not self._on_report(source, payload, log):
                return  # a report heard before (receivers repeat each one): no news
            if kind is Kind.CONFIRM and self.confirmations is not None:
                for worker, first, count in decode_confirmations(payload):
                    self.confirmations.confirm(worker, first, count)
            source.last_authentic = time.monotonic()
            source.warnings = 0
            self.changed.notify_all()

    def _on_report(self, source, payload, log):
        """Keep a report (its instance's earlier one replaced); False for a repeat of the
        instance's report kept, which changes nothing: not the count of receivers, not
        reported_at (--find-max's drain), not the silence of confirmations."""
        receiver_id, entry = payload[:RECEIVER_ID_SIZE], verdict.parse_report(
            payload[RECEIVER_ID_SIZE:])
        if len(receiver_id) != RECEIVER_ID_SIZE or entry is None:
            log.warning(f"[CONFIRM] a report from {source.endpoint} is not a run report;"
                        " ignored")
            return True
        if source.reports.get(receiver_id) == entry:
            return False
        if receiver_id not in source.reports:
            current = source.current()
            if current is not None:
                log.warning(f"[CONFIRM] {source.endpoint}: receiver instance"
                            f" {receiver_id.hex()} reports the run after instance"
                            f" {current[0].hex()}: it replaces it, and what the old one held"
                            " stays at risk")
            if len(source.reports) >= REPORTS_PER_SOURCE:
                del source.reports[next(iter(source.reports))]  # the oldest replaced one
        # A later report of an instance (the run healed) supersedes its earlier one.
        source.reports[receiver_id] = entry
        source.reported_at = time.monotonic()
        return True

    def on_link(self, source, connected):
        """The listener's socket monitor saw `source`'s channel connect, or fail to."""
        with self.changed:
            source.connected = connected
            source.settled = True
            self.changed.notify_all()

    def check_silence(self, health, log):
        """Say so when a channel brings no confirmation for SERVER_TIMEOUT while work waits;
        give up on it after SERVER_TIMEOUT x (1 + retries) if it never proved it is ours."""
        if self.confirmations is None:
            return
        now = time.monotonic()
        if not self.confirmations.pending():
            self._pending_since = None
            return
        if self._pending_since is None:
            self._pending_since = now
        for source in self.sources:
            if source.gave_up or not health.is_endpoint_up(source.data_endpoint):
                continue  # a receiver that is down: the heartbeat's give-up rules apply
            silent = now - max(source.last_authentic, self._pending_since)
            if silent >= self.timeout * (source.warnings + 1):
                source.warnings += 1
                self._say_silent(source, silent, log)
        if self.sources and all(s.gave_up for s in self.sources):
            self.confirmations.failure = Outcome.RECEIVER_DOWN

    def _say_silent(self, source, silent, log):
        proven = source.connected and source.authentic
        if source.warnings > self.retries and not proven:
            source.gave_up = True
            log.error(f"[CONFIRM] no confirmations from {source.endpoint} for {silent:.1f} s:"
                      f" giving up on it ({source.why_silent()})")
        else:
            log.warning(f"[CONFIRM] no confirmations from {source.endpoint} for {silent:.1f} s"
                        f" ({source.why_silent()})")


def set_sub_options(sub, config):
    """The options of the sender's confirmation-channel SUB socket, set before it connects:
    those of its data sockets that fit a SUB (`config`: the sender's Config), and heartbeats."""
    # ZMTP heartbeats drop a channel whose host died silently; libzmq then reconnects,
    # and subscribes again, when the host is back.
    set_heartbeats(sub, config.heartbeat_interval)
    set_link_options(sub, config)


class ConfirmListener(ServiceThread):
    """Subscribes to each receiver's confirmation channel for one run: applies confirmations,
    keeps reports, and watches each channel's link (ZMTP heartbeats find a dead host)."""

    def __init__(self, ctx, channel, health, config, stop, log):
        super().__init__("confirm-listener", log)
        self.ctx = ctx
        self.channel = channel
        self.health = health
        self.config = config  # the sender's Config: its sockets' options (set_sub_options)
        self.stop = stop

    def serve(self):
        """Subscribe to every channel, then follow messages and link events until the stop."""
        subs, monitors = [], []
        poller = zmq.Poller()
        try:
            for source in self.channel.sources:
                sub = self.ctx.socket(zmq.SUB)
                subs.append(sub)
                set_sub_options(sub, self.config)
                sub.setsockopt(zmq.MAXMSGSIZE, CHANNEL_MAX_BYTES)
                sub.setsockopt(zmq.RCVHWM, CHANNEL_RECEIVE_HWM)
                sub.subscribe(self.channel.seal.topic)
                monitors.append(sub.get_monitor_socket(MONITOR_EVENTS))
                sub.connect(source.endpoint)
                poller.register(sub, zmq.POLLIN)
                poller.register(monitors[-1], zmq.POLLIN)
            self.started()
            self.follow(poller, dict(zip(subs, self.channel.sources)),
                        dict(zip(monitors, self.channel.sources)))
        finally:
            for sub, monitor in zip(subs, monitors):
                sub.disable_monitor()
                monitor.close(linger=0)
            for sub in subs:
                sub.close(linger=0)

    def follow(self, poller, subs, monitors):
        """The loop: messages, link events, and the silence check between them."""
        channel = self.channel
        while not self.stop.is_set():
            for sock, _ in poller.poll(POLL_INTERVAL):
                if sock in subs:
                    channel.on_message(subs[sock], sock.recv_multipart(), self.log)
                else:
                    event = monitor_event(sock)
                    channel.on_link(monitors[sock], event == zmq.EVENT_HANDSHAKE_SUCCEEDED)
            channel.check_silence(self.health, self.log)
