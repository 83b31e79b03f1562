"""The sender's confirmation windows under --confirm: what each worker sent and no
receiver confirmed yet, and when to resend it (beside pushpull/push.py, the send path
it wraps; the listener, pushpull/listener.py, applies the confirmations).
"""

import threading
import time

from pushpull import wire
from pushpull.push import Outcome, PushSender
from pushpull.threads import POLL_S


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
