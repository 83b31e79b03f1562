"""The sender's flow control: workers take turns to send, the flush deadline, and the
bound on what can be in flight between a sender socket and a receiver."""

import collections
import contextlib
import threading
import time
from dataclasses import dataclass

from pushpull.threads import POLL_S


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
