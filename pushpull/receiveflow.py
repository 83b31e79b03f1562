"""The receiver's flow control: batches between its receive and processor threads, its
stop events, and the warm-stop drain."""

import queue
import threading
import time

from pushpull.threads import POLL_S
from pushpull.wire import CLIENT, RAW, RUN, WORKER


# ---------------------------------------------------------------------------
# The receiver: batches between its receive and processor threads, and its stops
# ---------------------------------------------------------------------------
class Batch:
    """Messages received together, and when (time.time_ns(); None for a spill file's),
    and their frames' size in bytes."""

    __slots__ = ("recv_ns", "items", "recovered", "nbytes")

    def __init__(self, recv_ns, items, recovered=False, nbytes=None):
        self.recv_ns = recv_ns
        self.items = items
        self.recovered = recovered  # read back from a spill file
        self.nbytes = sum(len(msg[RAW]) for msg in items) if nbytes is None else nbytes

    def rest(self, start):
        """The same batch from message `start` on."""
        return Batch(self.recv_ns, self.items[start:], self.recovered)


class BatchQueue(queue.Queue):
    """A queue.Queue of batches whose size and bound count messages, not batches; it
    also counts their bytes, against a second bound, maxbytes."""

    def __init__(self, maxsize, maxbytes):
        self.maxbytes = maxbytes
        super().__init__(maxsize)

    def _init(self, maxsize):
        super()._init(maxsize)
        self.depth = 0
        self.nbytes = 0

    def _qsize(self):
        return self.depth

    def _put(self, batch):
        self.queue.append(batch)
        self.depth += len(batch.items)
        self.nbytes += batch.nbytes

    def _get(self):
        batch = self.queue.popleft()
        self.depth -= len(batch.items)
        self.nbytes -= batch.nbytes
        return batch

    def put_handing_over(self, batch, timeout, handover):
        """put(); if the queue was empty (the processor waiting for work), then wait, at
        most `handover` s, until the processor has taken it."""
        # A processor woken by put() waits for the GIL while the receive thread goes on
        # receiving, and every recv() lets go of the GIL: with a thread waiting for it,
        # each let-go wakes that thread for nothing (py-spy --native, figure (2): a fifth
        # of the receive thread's samples in the GIL's futex calls, bench/README.md,
        # "Profiles"). Waiting here for the take instead, the processor runs its batch
        # while this thread sleeps, then sleeps on the queue while this thread receives.
        idle = handover > 0 and not self.queue  # unlocked: a hint; wrong, it costs `handover`
        self.put(batch, timeout=timeout)
        if idle:
            with self.not_full:
                self.not_full.wait_for(lambda: not self.queue, handover)

    def wait_for_room(self, timeout):
        """Wait until the queue has room; returns how many messages and bytes fit
        ((0, 0) on timeout)."""
        with self.not_full:
            if not self.not_full.wait_for(
                    lambda: self.depth < self.maxsize and self.nbytes < self.maxbytes, timeout):
                return 0, 0
            return self.maxsize - self.depth, self.maxbytes - self.nbytes

    def put_past_bound(self, batch):
        """Put a batch even when the queue is full: used only while stopping."""
        with self.mutex:
            self._put(batch)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def put_front(self, batch):
        """Put back a batch taken but not finished (a cold stop), ahead of all others."""
        with self.mutex:
            self.queue.appendleft(batch)
            self.depth += len(batch.items)
            self.nbytes += batch.nbytes
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def take_all(self):
        """Remove and return every queued message, in order (for the spill file)."""
        with self.mutex:
            items = [msg for batch in self.queue for msg in batch.items]
            self.queue.clear()
            self.depth = self.nbytes = 0
            self.not_full.notify_all()
            return items


class StopEvents:
    """The receiver's stops: warm (finish the backlog) and cold (stop now, spill the
    backlog), and receive_done (the receive thread has let go of its socket)."""

    def __init__(self):
        self.warm = threading.Event()
        self.cold = threading.Event()
        self.receive_done = threading.Event()

    def join(self, thread, signals, log, timeout=None):
        """Join `thread` (at most `timeout` seconds); a second Ctrl+C or SIGTERM meanwhile
        (`signals`, a StopSignals) makes the stop cold."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            thread.join(POLL_S)
            self.check_second(signals, log)

    def check_second(self, signals, log):
        """A second Ctrl+C or SIGTERM (`signals`, a StopSignals) makes the stop cold."""
        if signals.second.is_set() and not self.cold.is_set():
            self.cold.set()
            log.warning("[STOP] second signal: stopping at once")


# The warm stop's drain: the receive thread takes what is already on its way.
# Longer than Linux's least TCP retransmission timeout (200 ms): one lost segment, or a
# sender descheduled on a busy machine, no longer ends the drain while data is on its way
# (50 ms did, in tests at a load average of 3 to 22 on 2 cores).
STOP_DRAIN_QUIET = 250  # milliseconds without a message that end the warm-stop drain
STOP_DRAIN_LIMIT = 5.0  # seconds the warm-stop drain may take while senders keep sending
STILL_SENDING_WINDOW = 1.0  # seconds: senders heard in this last stretch count as sending
STILL_SENDING_COUNTED = 1000  # senders the drain tells apart at most, for its log line


class StopDrain:
    """The receive thread's warm stop: take everything already on its way, until the
    socket has been quiet for STOP_DRAIN_QUIET ms. What the queue's bound cannot hold
    goes to the spill file. Only senders that keep sending make it end on time, after
    STOP_DRAIN_LIMIT s, and its log line says how many were still sending."""

    def __init__(self, receive, batches, overflow, batch_max, log):
        self.receive = receive  # receive(sock, limit, max_bytes): a Batch off the socket, or None
        self.batches = batches  # the BatchQueue: what fits is processed for real
        self.overflow = overflow  # a spill.SpillWriter: what does not fit
        self.batch_max = batch_max  # messages in one batch at most
        self.log = log
        self.recent = set()  # senders heard in the last STILL_SENDING_WINDOW before the limit
        self.overflowing = False  # once one batch went to the spill file, all after it do

    def run(self, sock, monitor, peers, cold):
        """Drain `sock` until it is quiet, the time is up, a cold stop, or the spill file
        fails; `peers` (a gatekeeper.PeerWatch) keeps reading `monitor` meanwhile."""
        deadline = time.monotonic() + STOP_DRAIN_LIMIT
        while not cold.is_set():
            peers.read(monitor)
            if not sock.poll(STOP_DRAIN_QUIET):
                return
            now = time.monotonic()
            if now >= deadline:
                self.log_still_sending(peers.counters.peers)
                return
            batch, fits = self.take(sock)
            if batch is None:
                continue
            if now >= deadline - STILL_SENDING_WINDOW and len(self.recent) < STILL_SENDING_COUNTED:
                self.recent.update((msg[RUN], msg[WORKER] or msg[CLIENT]) for msg in batch.items)
            if fits:
                self.batches.put_past_bound(batch)  # it fits: taken up to the bound
            elif not self.spill(batch):
                return

    def take(self, sock):
        """The next batch off the socket, and whether it fits the queue's bound."""
        room, byte_room = (0, 0) if self.overflowing else self.batches.wait_for_room(0)
        if room > 0 and byte_room > 0:
            return self.receive(sock, min(self.batch_max, room), byte_room), True
        # A batch for the spill file is bounded like the queue, in messages and bytes.
        return self.receive(sock, self.batch_max, self.batches.maxbytes), False

    def spill(self, batch):
        """Save a batch beyond the queue's bound to the spill file; False if it failed."""
        try:
            self.overflow.write(batch.items)
        except OSError:
            self.log.error(f"[SPILL] cannot write {self.overflow.temporary}:"
                           f" {self.overflow.error}; stopped taking messages off the socket")
            return False
        self.overflowing = True
        return True

    def log_still_sending(self, connections):
        """The drain ran out of time: messages were still arriving; say from how many."""
        recent = len(self.recent)
        senders = f"at least {recent}" if recent >= STILL_SENDING_COUNTED else str(recent)
        self.log.warning(f"[STOP] still receiving after {STOP_DRAIN_LIMIT:g} s: messages from"
                         f" {senders} sender workers arrived in the last"
                         f" {STILL_SENDING_WINDOW:g} s ({connections} connections open);"
                         " what is still on its way is not received (its senders counted it"
                         " as sent: --confirm resends it)")
