"""The confirmation channel: a receiver's PUB tells senders what it processed, and how a run went.

Every message is three frames, sealed with a key only the run's sender and the
receivers holding its data know (docs/internals.md, "The confirmation channel"):
    [topic (8 bytes), body, mac (16 bytes)]
topic = the first 8 bytes of HMAC-SHA256(run id, "topic"); body = a kind byte,
then the payload; mac = the first 16 bytes of HMAC-SHA256(run id, topic + body).
The run id travels only in data frames, so a peer that binds the confirmation
port sees a topic it cannot invert and cannot seal a message of its own.
Kinds: CONFIRM, (worker, first task, count) triples processed since the last
one; REPORT, the receiver's 8-byte instance id then its runs[] entry as JSON,
published when the run's [RUN] line is logged (again when a run reported incomplete completes).

Both ends live here: the frame format and the endpoint rule they share, then the
sender's side (its unconfirmed windows, the listener, when to resend), then the
receiver's.
"""

import enum
import hashlib
import hmac
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from pushpull import verdict, wire
from pushpull.cli import MAX_PORT, wants_ipv6
from pushpull.health import set_heartbeats
from pushpull.links import RECONNECT_INTERVAL, keep_alive
from pushpull.push import Outcome, PushSender
from pushpull.security import apply_client_keys
from pushpull.threads import POLL_INTERVAL, POLL_S, ServiceThread

RUN_KEY = struct.Struct("!Q")  # the run id, as the HMAC key
CONFIRM_RANGE = struct.Struct("!III")
TOPIC_SIZE = 8  # bytes of the derived topic
MAC_SIZE = 16  # bytes of the truncated HMAC-SHA256
RECEIVER_ID_SIZE = 8  # bytes of a receiver's random instance id, in a REPORT
TOPIC_LABEL = b"pushpull confirmation topic"
# What a sender's confirmation SUB holds, at most CHANNEL_RECEIVE_HWM x CHANNEL_MAX_BYTES
# (16 MiB) per channel, whatever a peer on that port sends: a REPORT is at most
# verdict.REPORT_MAX_BYTES, a CONFIRM 12 bytes a range of tasks processed in one
# CONFIRM_INTERVAL (87,000 ranges: more than a receiver processes in 50 ms).
CHANNEL_MAX_BYTES = 1024 * 1024  # bytes: a larger message drops the peer (ZMQ_MAXMSGSIZE)
CHANNEL_RECEIVE_HWM = 16  # messages the SUB may hold unread per channel (ZMQ_RCVHWM)
SEAL_CACHE_SIZE = 1024  # runs whose keys a receiver keeps derived
REPORTS_PER_SOURCE = 4  # receiver instances (restarts) whose reports one channel keeps
# Link events of a confirmation channel: connected, or lost / refused.
LINK_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class Kind(enum.IntEnum):
    """What a confirmation-channel message carries."""

    CONFIRM = 1  # (worker, first task, count) triples processed
    REPORT = 2  # the receiver's runs[] entry for the run, when its [RUN] line is logged


class RunSeal:
    """The keys of one run's confirmation channel, derived from its run id."""

    def __init__(self, run_id):
        self._key = RUN_KEY.pack(run_id)
        self.topic = self._mac(TOPIC_LABEL)[:TOPIC_SIZE]

    def _mac(self, data):
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def seal(self, kind, payload):
        """The three frames of one message of `kind`."""
        body = bytes([kind]) + payload
        return [self.topic, body, self._mac(self.topic + body)[:MAC_SIZE]]

    def open(self, frames):
        """(Kind, payload) of a message sealed for this run, or None for anything else."""
        if len(frames) != 3 or frames[0] != self.topic or len(frames[2]) != MAC_SIZE:
            return None
        body = frames[1]
        if not body or not hmac.compare_digest(self._mac(self.topic + body)[:MAC_SIZE],
                                               frames[2]):
            return None
        try:
            return Kind(body[0]), body[1:]
        except ValueError:
            return None


TASK_BITS = 32  # a processed task's key: worker << TASK_BITS | task (a task is a uint32)
TASK_MASK = (1 << TASK_BITS) - 1


def task_key(worker, task):
    """The key of a processed task in ConfirmPublisher: one int, sorted by worker, then task."""
    return worker << TASK_BITS | task


def task_ranges(keys):
    """(worker, first task, count) triples covering the tasks whose task_key()s are in
    `keys`, each task once."""
    # Once per publication, over every task processed since the last one: over sorted
    # ints, 0.05 µs a task where (worker, task) pairs took 0.13 µs (bench/README.md,
    # "Profiles", issue 22). A range never spans two
    # workers: a task is below COUNT_MAX, so the key after a worker's last task is
    # never the next worker's first.
    ranges, end = [], -1  # end: the key just after the last range
    for key in sorted(keys):
        if key == end:
            last[2] += 1
            end += 1
        elif key > end:  # (below it: a task listed twice)
            last = [key >> TASK_BITS, key & TASK_MASK, 1]
            ranges.append(last)
            end = key + 1
    return ranges


def encode_confirmations(seal, keys):
    """One CONFIRM message for the tasks processed (their task_key()s), sealed for its run."""
    body = b"".join(CONFIRM_RANGE.pack(*triple) for triple in task_ranges(keys))
    return seal.seal(Kind.CONFIRM, body)


def decode_confirmations(body):
    """(worker, first task, count) triples from a confirmation body."""
    usable = len(body) - len(body) % CONFIRM_RANGE.size
    return [CONFIRM_RANGE.unpack_from(body, offset)
            for offset in range(0, usable, CONFIRM_RANGE.size)]


def confirm_port(data_port, port=None):
    """The port confirmations are published on: `port` when given, else the data port + 1.

    ValueError when that is no port number (data port 65535 without `port`)."""
    result = port if port else data_port + 1
    if not 1 <= result <= MAX_PORT:
        raise ValueError(f"confirmation port {result} is not a port number (1-{MAX_PORT}):"
                         " give --confirm-port")
    return result


def confirm_endpoint(endpoint, port=None):
    """Where the receiver at `endpoint` publishes confirmations: the same host, confirm_port()."""
    match = re.match(r"^tcp://(.+):(\d+)$", endpoint)
    if not match:
        raise ValueError(f"--confirm needs tcp://HOST:PORT endpoints, not {endpoint}")
    return f"tcp://{match[1]}:{confirm_port(int(match[2]), port)}"


# ---------------------------------------------------------------------------
# The sender's side: unconfirmed windows, the listener, the resend policy
# ---------------------------------------------------------------------------
class UnconfirmedWindow:
    """One worker's sent-but-unconfirmed frames: the worker adds, confirmations remove."""

    def __init__(self, size):
        self.size = size
        self.frames = {}  # task -> frame, in the order sent
        self.confirmed = 0
        self.resent = 0  # written by the worker only
        self.changed = threading.Condition()

    def __len__(self):
        return len(self.frames)

    def add(self, task, frame):
        """Hold a frame until the receiver confirms it (only its worker adds)."""
        self.frames[task] = frame  # one dict store: atomic, no lock needed

    def confirm(self, first, count):
        """Drop confirmed tasks; returns how many were waiting for it."""
        with self.changed:
            pop = self.frames.pop
            # A range wider than the window walks the window, not the range it names.
            tasks = (range(first, first + count) if count <= len(self.frames)
                     else [task for task in list(self.frames) if first <= task < first + count])
            hits = sum(1 for task in tasks if pop(task, None) is not None)
            if hits:
                self.confirmed += hits
                self.changed.notify_all()
            return hits

    def wait_for_room(self, timeout):
        """Wait until the window has room; False after `timeout` seconds without."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.frames) < self.size, timeout)

    def wait_for_change(self, timeout):
        """Wait for a confirmation, at most `timeout` seconds."""
        with self.changed:
            self.changed.wait(timeout)

    def discard(self, task):
        """Forget a task that was never sent after all."""
        with self.changed:
            self.frames.pop(task, None)

    def unconfirmed(self):
        """A snapshot of (task, frame) pairs still waiting, oldest first."""
        with self.changed:
            return list(self.frames.items())


class Confirmations:
    """One --confirm run on the sender: a window per worker, and the stall clock.

    A stall (no confirmation for SERVER_TIMEOUT while a receiver is up) is declared
    once for all workers, so they all resend in the same round: a worker checking
    a moment later would otherwise see the others' resends confirmed and wait a
    whole timeout more.
    """

    def __init__(self, workers, size, first=0):
        self.windows = [UnconfirmedWindow(size) for _ in range(workers)]
        # Workers first + 1 ... first + workers are ours: another instance of a shared run
        # (--instances) has the others, whose confirmations cost a comparison each.
        self.first = first
        self.last = time.monotonic()  # when any confirmation last arrived
        self.stalls = 0
        self.failure = None  # the Outcome every worker gives up with: no channel confirms
        self._last_stall = 0.0
        self._lock = threading.Lock()

    def window(self, worker):
        """The unconfirmed window of one of our workers (its run-wide number)."""
        return self.windows[worker - self.first - 1]

    def confirm(self, worker, first, count):
        """Apply one confirmed range; a worker that is not ours is ignored."""
        index = worker - self.first - 1
        if 0 <= index < len(self.windows) and self.windows[index].confirm(first, count):
            self.last = time.monotonic()

    def check_stall(self, timeout):
        """Declare a stall if nothing was confirmed for `timeout` s; returns the stall count."""
        with self._lock:
            now = time.monotonic()
            if now - max(self.last, self._last_stall) >= timeout:
                self.stalls += 1
                self._last_stall = now
            return self.stalls

    def pending(self):
        """Tasks sent and not yet confirmed, over all workers."""
        return sum(len(w) for w in self.windows)

    def confirmed(self):
        """Tasks confirmed processed, over all workers."""
        return sum(w.confirmed for w in self.windows)

    def resent(self):
        """Frames resent, over all workers."""
        return sum(w.resent for w in self.windows)


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

        A receiver publishes its report once; a subscription made after that hears nothing.
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
            source.last_authentic = time.monotonic()
            source.warnings = 0
            if kind is Kind.CONFIRM and self.confirmations is not None:
                for worker, first, count in decode_confirmations(payload):
                    self.confirmations.confirm(worker, first, count)
            elif kind is Kind.REPORT:
                self._on_report(source, payload, log)
            self.changed.notify_all()

    def _on_report(self, source, payload, log):
        receiver_id, entry = payload[:RECEIVER_ID_SIZE], verdict.parse_report(
            payload[RECEIVER_ID_SIZE:])
        if len(receiver_id) != RECEIVER_ID_SIZE or entry is None:
            log.warning(f"[CONFIRM] a report from {source.endpoint} is not a run report;"
                        " ignored")
            return
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
    sub.setsockopt(zmq.IPV6, wants_ipv6(config.endpoints))
    sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL)
    sub.setsockopt(zmq.HANDSHAKE_IVL, int(config.heartbeat_interval * 1000))
    keep_alive(sub)
    apply_client_keys(sub, config.curve_keys)


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
                monitors.append(sub.get_monitor_socket(LINK_EVENTS))
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
                    event = recv_monitor_message(sock)["event"]
                    channel.on_link(monitors[sock], event == zmq.EVENT_HANDSHAKE_SUCCEEDED)
            channel.check_silence(self.health, self.log)


class ConfirmingSender(PushSender):
    """A worker's PushSender under --confirm: each frame waits in the worker's window until
    a receiver confirms it processed it, and is resent when a receiver went down or
    confirmations stalled (a receiver drops what it had processed as a duplicate).
    """

    def __init__(self, sock, name, team, tally, links, confirmations, window, limit):
        super().__init__(sock, name, team, tally, links)
        self.confirmations = confirmations
        self.window = window
        self.limit = limit  # seconds confirmations get after a send (--confirm-timeout)
        self._downs_seen = 0
        self._stalls_seen = 0
        self._down_since = None  # when this worker, waiting for confirmations, saw none up

    def send(self, frame, task):
        """Send a task's frame once the window has room; None, or the failure's Outcome."""
        window = self.window
        if (len(window) >= window.size or self.health.down_transitions != self._downs_seen
                or self.confirmations.failure):
            failure = self._make_room()
            if failure:
                return failure
            frame = wire.restamp(frame)  # it waited: its send time is now
        window.add(task, frame)  # before sending: its confirmation may come at once
        failure = super().send(frame, task)
        if failure:
            window.discard(task)
        return failure

    def send_many(self, frame_of, tasks, max_size):
        """Nothing is sent here (returns tasks.start): each frame goes through send(), which
        keeps it in the window until it is confirmed."""
        return tasks.start

    def finish(self):
        """After the last task: wait until every sent task is confirmed, resending as needed,
        for at most --confirm-timeout."""
        deadline = time.monotonic() + self.limit
        while len(self.window) and not self.stop.is_set():
            if (self.health.all_rejected() or self.resend_if_lost() or self.down_too_long()
                    or self.past(deadline)):
                return
            self.window.wait_for_change(POLL_S)

    def past(self, deadline):
        """True (and said) once `deadline` (time.monotonic()) has passed with messages
        unconfirmed: the receivers had --confirm-timeout s since this worker's last send."""
        if time.monotonic() < deadline:
            return False
        self.log.error(f"[FAIL] {self.name} gives up: {len(self.window)} messages unconfirmed"
                       f" {self.limit:g} s after its last send (--confirm-timeout)")
        return True

    def _make_room(self):
        """Wait off turn until the window has room, resending when a receiver was lost."""
        with self.turn.off():
            waited = False
            deadline = time.monotonic() + self.limit  # the worker's last send was just now
            while not self.window.wait_for_room(POLL_S):
                if self.stop.is_set():
                    return Outcome.INTERRUPTED
                failure = self.resend_if_lost() or self.down_too_long()
                if failure:
                    return failure
                if self.past(deadline):
                    return Outcome.CONFIRM_TIMEOUT
                if not waited:
                    waited = True
                    self.log.info(f"[WAIT] {self.name} waiting: {len(self.window)} messages"
                                  " unconfirmed, window full (backpressure)")
            return self.resend_if_lost()

    def down_too_long(self):
        """Give up (Outcome.RECEIVER_DOWN) once no receiver was up for SERVER_TIMEOUT x
        (1 + retries) while this worker waited for confirmations; else None.

        A resend into a connection that a silent partition left open does not block,
        so the send path's own give-up never comes: this clock does.
        """
        if self.health.is_up():
            self._down_since = None
            return None
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        limit = self.timeout * (1 + self.retries)
        if now - self._down_since < limit:
            return None
        self.log.error(f"[FAIL] {self.name} gives up: no receiver up for {limit:g} s with"
                       f" {len(self.window)} messages unconfirmed")
        return Outcome.RECEIVER_DOWN

    def _drop_dead_receivers(self):
        """Before a resend round: drop the connections to receivers the heartbeat calls down,
        and let the socket take that in (ReceiverLinks.settle), so the round goes to live
        receivers only: else half of it would still be dealt to the dead receiver and
        wait a stall to be resent."""
        if self.links.follow():  # even if health.changes lags down_transitions
            self.links.settle(self.stop)

    def resend_if_lost(self):
        """Resend every unconfirmed task after a receiver went down, or when confirmations stall.

        A receiver that dies takes what it had not processed with it; a confirmation
        can be missed. Returns None, or the failure's Outcome.
        """
        if self.confirmations.failure:
            return self.confirmations.failure  # the listener said why, naming the channel
        downs = self.health.down_transitions
        if not len(self.window):
            self._stalls_seen = self.confirmations.stalls  # no stall could concern us
        stalls = self._stalls_seen
        if len(self.window) and self.health.is_up():
            stalls = self.confirmations.check_stall(self.timeout)
        stalled = stalls != self._stalls_seen
        if downs == self._downs_seen and not stalled:
            return None
        self._downs_seen, self._stalls_seen = downs, stalls
        self._drop_dead_receivers()
        pending = self.window.unconfirmed()
        if pending:
            why = "a receiver went down" if not stalled else "confirmations stalled"
            self.log.warning(f"[RESEND] {self.name}: {why}; resending {len(pending)}"
                             " unconfirmed messages")
        for task, frame in pending:
            failure = self.deliver(wire.mark_resent(frame), task)
            if failure:
                return failure
            self.window.resent += 1
        return None


# ---------------------------------------------------------------------------
# The receiver's side: what was processed and not yet confirmed, and each run's report
# ---------------------------------------------------------------------------
class ConfirmPublisher:
    """Publishes on the processor's PUB socket, sealed for each run: the tasks processed
    but not yet confirmed, at most every `interval` seconds (one CONFIRM per run), and a
    run's report when its [RUN] line is logged."""

    def __init__(self, sock, interval):
        self.sock = sock
        self.interval = interval
        self.receiver_id = os.urandom(RECEIVER_ID_SIZE)  # tells a sender which reports match
        self._pending = {}  # run id -> [task_key(), ...] since the last publication
        self._seals = {}  # run id -> RunSeal: one key derivation per run, not per message
        self._next = 0.0

    def add(self, run_id, worker, task):
        """A task of a --confirm run was processed (or arrived again after it was)."""
        self._pending.setdefault(run_id, []).append(worker << TASK_BITS | task)

    def add_keys(self, run_id, keys):
        """add() for many tasks of one run, given by their task_key()s."""
        self._pending.setdefault(run_id, []).extend(keys)

    def publish_if_due(self):
        """Publish what is pending if `interval` has passed since the last publication."""
        if self._pending and time.monotonic() >= self._next:
            self.publish()

    def publish(self):
        """Publish what is pending now."""
        self._next = time.monotonic() + self.interval
        pending, self._pending = self._pending, {}
        for run_id, tasks in pending.items():
            self._send(encode_confirmations(self._seal(run_id), tasks))

    def report(self, run_id, entry):
        """Publish a run's runs[] entry (its report), cut to REPORT_MAX_BYTES."""
        payload = self.receiver_id + report_json(entry)
        self._send(self._seal(run_id).seal(Kind.REPORT, payload))

    def _seal(self, run_id):
        seal = self._seals.get(run_id)
        if seal is None:
            if len(self._seals) >= SEAL_CACHE_SIZE:
                self._seals.clear()  # bounded: recomputed on demand
            seal = self._seals[run_id] = RunSeal(run_id)
        return seal

    def _send(self, frames):
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB never blocks; a sender that misses a confirmation resends


def report_json(entry):
    """A runs[] entry as JSON of at most REPORT_MAX_BYTES: long lists are cut until it fits."""
    entry = dict(entry)
    data = json.dumps(entry, separators=(",", ":")).encode()
    while len(data) > verdict.REPORT_MAX_BYTES:
        lists = [key for key, value in entry.items() if isinstance(value, list) and value]
        if not lists:
            kept = (*verdict.COUNTS, "run_id", "missing", "latency_ms")  # what the sender uses
            return json.dumps({key: entry[key] for key in kept if key in entry}).encode()
        longest = max(lists, key=lambda key: len(entry[key]))
        entry[longest] = entry[longest][:len(entry[longest]) // 2]
        data = json.dumps(entry, separators=(",", ":")).encode()
    return data
