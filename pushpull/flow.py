"""Flow control between threads: stop signals; the sender's turns to send; the
receiver's batch queue, its stops and its warm-stop drain."""

import collections
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass

from pushpull.threads import POLL_S
from pushpull.wire import CLIENT, RAW, RUN, WORKER


SIGNAL_WAKE_S = 0.05  # seconds: how soon a waiting main thread sees a signal's flag


class SignalFlag:
    """What a signal handler sets: a plain attribute, never a lock. A handler runs in the
    main thread between two bytecodes, so a threading.Event it set could be one whose
    lock the main thread held at that moment (inside its own wait()): the handler then
    waited for itself, and the receiver never heard Ctrl+C (issue 19, case 11)."""

    def __init__(self):
        self.flag = False

    def is_set(self):
        """True once the signal came."""
        return self.flag

    def wait(self, timeout):
        """Wait up to `timeout` s for the signal (seen within SIGNAL_WAKE_S); is_set()."""
        deadline = time.monotonic() + timeout
        while not self.flag:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, SIGNAL_WAKE_S))
        return self.flag


class StopSignals:
    """Counts Ctrl+C / SIGTERM: the first sets `first`, the second `second`, a third exits
    at once, after `last_words()` (if set) has said what that drops and cleaned up.

    With exit_on_second the second signal exits at once, even while the main
    thread is blocked in a flush. The handler takes no lock: see SignalFlag.
    """

    def __init__(self, exit_on_second=False):
        self.first = SignalFlag()
        self.second = SignalFlag()
        self.exit_on_second = exit_on_second
        self.count = 0
        self.last_words = None  # () -> text: the exit at once's line (set by the script)

    def install(self):
        """Handle SIGINT, and SIGTERM and Windows' SIGBREAK (Ctrl+Break) where they exist."""
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def ignore(self):
        """Ignore them from now on: the process is exiting with its status decided (a
        signal during the interpreter's shutdown would kill it by the signal)."""
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.first.flag = True
        elif self.count == 2 and not self.exit_on_second:
            self.second.flag = True
        else:
            words = ""
            if self.last_words is not None:
                try:
                    words = self.last_words()
                except Exception as exc:  # noqa: BLE001 (exiting at once whatever it was)
                    words = f"(could not count what is dropped: {exc!r})"
            # os.write: no buffer lock, which the interrupted main thread may hold.
            os.write(2, f"interrupted again: exiting at once{words}\n".encode())
            os._exit(130)


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGBREAK")  # where the platform has them


# ---------------------------------------------------------------------------
# The sender: workers take turns to send
# ---------------------------------------------------------------------------
# Messages a worker sends before it lets a waiting worker have a turn: in bench
# figure (2), 1000 was about 6 % faster than 100, 20 about 25 % slower (bench/README.md).
# 5000 was about 7 % faster still on a busy machine (issue 22), but then a run of up to
# 5000 messages a worker sends one worker after the other: the seed's workers all send
# from the start (tests/test_pair.py).
TURN_MESSAGES = 1000


class SendTurns:
    """Lets one worker at a time run its send loop; the others wait for a turn, in order.

    Python runs one thread at a time anyway, and pyzmq lets go of the GIL in every
    send: with fifty workers ready at once, each send woke another worker for
    nothing. Fifty workers sent at 150k msg/s into a fast sink, one at 550k;
    taking turns brought fifty back to 400-500k (bench figure (2), bench/README.md,
    Performance). A worker holds its turn for at most TURN_MESSAGES messages,
    and never while it waits for the receiver, its delay or its window.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = collections.deque()  # gates of waiting workers, first come first served
        self._taken = False

    def take(self, gate, stop):
        """Wait for the turn; False if `stop` was set first.

        `gate` is the caller's own Lock, held by it: give() releases it to hand over.
        """
        with self._lock:
            if not self._taken:
                self._taken = True
                return True
            self._waiting.append(gate)
        while not gate.acquire(timeout=POLL_S):
            if stop.is_set():
                with self._lock:
                    if gate in self._waiting:
                        self._waiting.remove(gate)
                        return False
                # Not waiting any more: give() released the gate just now, under the lock.
                return gate.acquire(blocking=False)
        return True

    def give(self):
        """Hand the turn to the worker that has waited longest, if any."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._taken = False

    def waiting(self):
        """How many workers wait for a turn."""
        return len(self._waiting)  # read without the lock: a moment's staleness is harmless


class WorkerTurn:
    """One worker's place in SendTurns: its gate, and whether it holds the turn now."""

    def __init__(self, turns, stop):
        self._turns = turns
        self._stop = stop
        self._gate = threading.Lock()
        self._gate.acquire()  # released by the worker that hands us the turn
        self.held = False

    def take(self):
        """Wait for the turn (False in `held` if the stop came first)."""
        self.held = self._turns.take(self._gate, self._stop)

    def give(self):
        """Give the turn up, if this worker holds it."""
        if self.held:
            self.held = False
            self._turns.give()

    def share(self):
        """Let the worker that waits longest have a turn, then queue for the next one."""
        if self.held and self._turns.waiting():
            self.give()
            self.take()

    @contextlib.contextmanager
    def off(self):
        """Let other workers send while this one waits (a no-op outside a turn)."""
        if not self.held:
            yield
            return
        self.give()
        yield  # an error leaves without the turn: nobody waits for it behind the queue
        self.take()


class FlushDeadline:
    """One flush deadline for every worker socket of a run, timed from the end of the run.

    A worker keeps its socket open until the run ends (its last message may sit in
    ZeroMQ's queue), then closes it with what is left of the deadline as its linger:
    a socket closed early would otherwise run out of linger before the others.
    """

    def __init__(self, seconds):
        self.seconds = seconds
        self.started_at = None  # time.monotonic() at the end of the run
        self.at = None  # time.monotonic() by which every socket must have flushed
        self._started = threading.Event()

    def start(self):
        """The run has ended: the deadline runs from now (a second call changes nothing)."""
        if not self._started.is_set():
            self.started_at = time.monotonic()
            self.at = self.started_at + self.seconds
            self._started.set()

    def wait_started(self, timeout):
        """Wait at most `timeout` s for the end of the run; True once it has ended."""
        return self._started.wait(timeout)

    def linger_ms(self):
        """Wait for the end of the run; then the milliseconds left to the deadline."""
        while not self._started.wait(POLL_S):
            pass  # every worker's end comes before start(): main calls it after them
        return max(0, int((self.at - time.monotonic()) * 1000))

    def met(self, now):
        """True when `now` is before the deadline by more than a timer's slack: a
        context term that returned then did not have to cut any socket's linger."""
        return now < self.at - FLUSH_SLACK


@dataclass(frozen=True)
class FlushResult:
    """Whether every worker's messages left the process before the run's flush deadline."""

    complete: bool
    unflushed_at_most: int  # sent messages a flush cut short may have lost (0 when complete)
    seconds: float  # from the end of the run to the end of the flush


# Seconds before the flush deadline that still count as met: lingers are whole
# milliseconds, and libzmq's timers fire within a few of their time.
FLUSH_SLACK = 0.05

# What can sit between a sender socket and a receiver, besides the two high-water
# marks: libzmq's engines encode and decode 8 KiB at a time (ZMQ_OUT_BATCH_SIZE,
# ZMQ_IN_BATCH_SIZE), and Linux doubles the SO_SNDBUF / SO_RCVBUF asked for (socket(7)).
ZMQ_BATCH_BYTES = 8192  # bytes an engine holds outside its pipe, per direction
KERNEL_BUFFER_FACTOR = 2  # bytes a kernel buffers per byte of SO_SNDBUF / SO_RCVBUF asked
ZMTP_FRAME_OVERHEAD = 2  # bytes before a short frame on the wire: flags and length


def in_flight_bound(frame_bytes, send_hwm, receive_hwm, send_buffer, receive_buffer):
    """The most messages that can sit between one sender socket and one receiver's
    application, per connection.

    SNDHWM + the peer's RCVHWM + what both kernel buffers and both engines' 8 KiB
    batches hold, counted in the smallest frame sent (`frame_bytes`): a message still
    anywhere on this path when a flush is cut short, or a receiver dies, may be lost.
    The buffer sizes are the SO_SNDBUF / SO_RCVBUF the sockets asked for.
    """
    wire_bytes = max(1, frame_bytes) + ZMTP_FRAME_OVERHEAD

    def messages(buffered):
        return -(-buffered // wire_bytes)  # rounded up: a partly held message counts

    return (send_hwm + receive_hwm
            + 2 * messages(ZMQ_BATCH_BYTES)
            + messages(KERNEL_BUFFER_FACTOR * send_buffer)
            + messages(KERNEL_BUFFER_FACTOR * receive_buffer))


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
STOP_DRAIN_QUIET = 50  # milliseconds without a message that end the warm-stop drain
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
        fails; `peers` (a security.PeerWatch) keeps reading `monitor` meanwhile."""
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
