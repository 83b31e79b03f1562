"""The confirmation channel: a receiver's PUB tells --confirm senders what it processed.

Frames are [topic, ranges]: topic = run id (8 bytes), then (worker, first task,
count) triples for tasks processed since the last confirmation.

Both ends live here: the frame format and the endpoint rule they share, then the
sender's side (its unconfirmed windows, the listener, when to resend), then the
receiver's.
"""

import re
import struct
import threading
import time

import zmq

from pushpull import security, wire
from pushpull.push import Outcome, PushSender
from pushpull.threads import POLL_INTERVAL, POLL_S, ServiceThread

CONFIRM_TOPIC = struct.Struct("!Q")
CONFIRM_RANGE = struct.Struct("!III")


def task_ranges(tasks):
    """(worker, first task, count) triples covering the (worker, task) pairs in `tasks`."""
    ranges = []
    for worker, task in sorted(tasks):
        if ranges and ranges[-1][0] == worker:
            end = ranges[-1][1] + ranges[-1][2]
            if task == end:
                ranges[-1][2] += 1
            if task <= end:
                continue  # extended, or a task listed twice
        ranges.append([worker, task, 1])
    return ranges


def encode_confirmations(run_id, tasks):
    """One confirmation frame pair: [topic, ranges] for the (worker, task) pairs processed."""
    body = b"".join(CONFIRM_RANGE.pack(*triple) for triple in task_ranges(tasks))
    return [CONFIRM_TOPIC.pack(run_id), body]


def decode_confirmations(body):
    """(worker, first task, count) triples from a confirmation body."""
    usable = len(body) - len(body) % CONFIRM_RANGE.size
    return [CONFIRM_RANGE.unpack_from(body, offset)
            for offset in range(0, usable, CONFIRM_RANGE.size)]


def confirm_port(data_port, port=None):
    """The port confirmations are published on: `port` when given, else the data port + 1."""
    return port if port else data_port + 1


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
            hits = sum(1 for task in range(first, first + count) if pop(task, None) is not None)
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

    def __init__(self, workers, size):
        self.windows = [UnconfirmedWindow(size) for _ in range(workers)]
        self.last = time.monotonic()  # when any confirmation last arrived
        self.stalls = 0
        self._last_stall = 0.0
        self._lock = threading.Lock()

    def confirm(self, worker, first, count):
        """Apply one confirmed range; a worker number outside the run is ignored."""
        if 1 <= worker <= len(self.windows) and self.windows[worker - 1].confirm(first, count):
            self.last = time.monotonic()

    def check_stall(self, timeout):
        """Declare a stall if nothing was confirmed for `timeout` s; returns the stall count."""
        with self._lock:
            now = time.monotonic()
            if now - max(self.last, self._last_stall) >= timeout:
                self.stalls += 1
                self._last_stall = now
            return self.stalls

    def confirmed(self):
        """Tasks confirmed processed, over all workers."""
        return sum(w.confirmed for w in self.windows)

    def resent(self):
        """Frames resent, over all workers."""
        return sum(w.resent for w in self.windows)


class ConfirmListener(ServiceThread):
    """Subscribes to the receivers' confirmations of one run and empties the windows."""

    def __init__(self, ctx, sources, run_id, confirmations, client_keys, stop, log):
        super().__init__("confirm-listener", log)
        self.ctx = ctx
        self.sources = sources  # confirmation endpoints, one per receiver
        self.topic = CONFIRM_TOPIC.pack(run_id)
        self.confirmations = confirmations
        self.client_keys = client_keys
        self.stop = stop

    def serve(self):
        """Subscribe, then apply each confirmation until the stop."""
        with self.ctx.socket(zmq.SUB) as sub:
            sub.linger = 0
            security.apply_client_keys(sub, self.client_keys)
            sub.subscribe(self.topic)
            for endpoint in self.sources:
                sub.connect(endpoint)
            self.started()
            while not self.stop.is_set():
                if sub.poll(POLL_INTERVAL):
                    self.on_message(sub.recv_multipart())

    def on_message(self, frames):
        """Apply a confirmation [topic, ranges]; anything else is skipped."""
        if len(frames) != 2:
            return
        for worker, first, count in decode_confirmations(frames[1]):
            self.confirmations.confirm(worker, first, count)


class ConfirmingSender(PushSender):
    """A worker's PushSender under --confirm: each frame waits in the worker's window until
    a receiver confirms it processed it, and is resent when a receiver went down or
    confirmations stalled (a receiver drops what it had processed as a duplicate).
    """

    def __init__(self, sock, name, team, tally, confirmations, window):
        super().__init__(sock, name, team, tally)
        self.confirmations = confirmations
        self.window = window
        self._downs_seen = 0
        self._stalls_seen = 0

    def send(self, frame, task):
        """Send a task's frame once the window has room; None, or the failure's Outcome."""
        window = self.window
        if len(window) >= window.size or self.health.down_transitions != self._downs_seen:
            failure = self._make_room()
            if failure:
                return failure
            frame = wire.restamp(frame)  # it waited: its send time is now
        window.add(task, frame)  # before sending: its confirmation may come at once
        failure = super().send(frame, task)
        if failure:
            window.discard(task)
        return failure

    def finish(self):
        """After the last task: wait until every sent task is confirmed, resending as needed."""
        while len(self.window) and not self.stop.is_set():
            if self.health.all_rejected() or self.resend_if_lost():
                return
            self.window.wait_for_change(POLL_S)

    def _make_room(self):
        """Wait off turn until the window has room, resending when a receiver was lost."""
        with self.turn.off():
            waited = False
            while not self.window.wait_for_room(POLL_S):
                if self.stop.is_set():
                    return Outcome.INTERRUPTED
                failure = self.resend_if_lost()
                if failure:
                    return failure
                if not waited:
                    waited = True
                    self.log.info(f"[WAIT] {self.name} waiting: {len(self.window)} messages"
                                  " unconfirmed, window full (backpressure)")
            return self.resend_if_lost()

    def resend_if_lost(self):
        """Resend every unconfirmed task after a receiver went down, or when confirmations stall.

        A receiver that dies takes what it had not processed with it; a confirmation
        can be missed. Returns None, or the failure's Outcome.
        """
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
# The receiver's side: what was processed and not yet confirmed, published as ranges
# ---------------------------------------------------------------------------
class ConfirmPublisher:
    """Tasks processed but not yet confirmed, published on the processor's PUB socket
    at most every `interval` seconds: one [topic, ranges] message per run."""

    def __init__(self, sock, interval):
        self.sock = sock
        self.interval = interval
        self._pending = {}  # run id -> [(worker, task), ...] since the last publication
        self._next = 0.0

    def add(self, run_id, worker, task):
        """A task of a --confirm run was processed (or arrived again after it was)."""
        self._pending.setdefault(run_id, []).append((worker, task))

    def publish_if_due(self):
        """Publish what is pending if `interval` has passed since the last publication."""
        if self._pending and time.monotonic() >= self._next:
            self.publish()

    def publish(self):
        """Publish what is pending now."""
        self._next = time.monotonic() + self.interval
        pending, self._pending = self._pending, {}
        for run_id, tasks in pending.items():
            try:
                self.sock.send_multipart(encode_confirmations(run_id, tasks), zmq.NOBLOCK)
            except zmq.Again:
                pass  # PUB never blocks; a sender that misses this resends, and is re-confirmed
