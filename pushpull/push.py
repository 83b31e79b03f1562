"""One sender worker's PUSH socket: what became of each message, and the send path.

The worker's loop calls PushSender.send() once per message. The speed tricks of
that path live here and in sendflow.SendTurns, each with the bench figure that
justifies it (bench/README.md); the script's loop reads plainly.
"""

import contextlib
import enum
import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from pushpull.sendflow import TURN_MESSAGES, FlushDeadline, SendTurns, WorkerTurn
from pushpull.health import ReceiverHealth, monitor_event
from pushpull.threads import POLL_INTERVAL, POLL_S

WAIT_LOG_AFTER = 1.0  # seconds of backpressure before a worker says it is waiting
NOTICE_REPEAT = 10.0  # seconds before a cause the workers share is logged again
HELD_WAIT_MS = 2  # milliseconds a flood's worker waits for room before it gives its turn up
END_REPEAT_INTERVAL = 0.1  # seconds before a worker's second round of END frames (several
# receivers); each later round waits twice as long, at most END_REPEAT_MAX
END_REPEAT_MAX = 1.0  # seconds between two rounds at most


class Outcome(enum.Enum):
    """What became of one planned message."""

    SENT = "sent"  # accepted by ZeroMQ while the receiver was connected
    RECEIVER_DOWN = "receiver_down"  # gave up after SERVER_TIMEOUT x (1 + retries)
    INTERRUPTED = "interrupted"  # Ctrl+C or SIGTERM came first
    TOO_LARGE = "too_large"  # over MAX_MESSAGE_SIZE, refused before sending
    REJECTED = "rejected"  # every receiver refused this sender's CURVE key / address
    WORKER_ERROR = "worker_error"  # the worker thread failed (traceback in the log)
    CONFIRM_TIMEOUT = "confirm_timeout"  # --confirm: no room in the window within the limit


FAILURES = tuple(o for o in Outcome if o is not Outcome.SENT)


@dataclass
class WorkerTally:
    """One worker's counts; only that worker writes them."""

    sent: int = 0  # a plain int: counted once per message, on the hot path
    failed: dict = field(default_factory=lambda: dict.fromkeys(FAILURES, 0))
    waiting: bool = False  # in a wait for the receiver now (the [STATS] line counts these)
    not_sent: list = field(default_factory=list)  # range()s of tasks never handed to ZeroMQ

    def not_sending(self, tasks, outcome):
        """Count the tasks in `tasks` (a range) as never sent, for `outcome`."""
        self.failed[outcome] += len(tasks)
        self.not_sent.append(tasks)

    def done(self):
        """Tasks accounted for so far: sent or failed."""
        return self.sent + sum(self.failed.values())

    def gave_up(self):
        """True when the worker gave up on its receivers (down too long, or refused)."""
        return bool(self.failed[Outcome.RECEIVER_DOWN] or self.failed[Outcome.REJECTED])


@dataclass
class _Cause:
    """How often the workers met one cause, and when it was last logged."""

    level: int
    workers: set = field(default_factory=set)
    events: int = 0
    logged: int = 0  # lines logged
    logged_at: float = float("-inf")  # time.monotonic() of the last
    epoch: int = -1  # the heartbeat's verdict count then (ReceiverHealth.changes)


class WorkerNotices:
    """The workers' [WAIT], [RETRY] and [FAIL] lines, one per cause: the first worker to
    meet a cause logs its line, the others are counted (a new line after NOTICE_REPEAT s,
    or once the heartbeat changed its verdict); log_counts() says, at the end, how many
    workers met each cause whose lines were left out."""

    def __init__(self, log):
        self.log = log
        self._lock = threading.Lock()
        self._causes = {}  # (tag, verb, cause) -> _Cause, in the order first met

    def say(self, level, line, name, cause, epoch):
        """Log `line` of worker `name` unless another one met `cause` (a (tag, verb in the
        past tense, reason) tuple) lately, in the same heartbeat `epoch`; count it."""
        now = time.monotonic()
        with self._lock:
            met = self._causes.setdefault(cause, _Cause(level))
            met.workers.add(name)
            met.events += 1
            if met.epoch == epoch and now - met.logged_at < NOTICE_REPEAT:
                return
            met.logged += 1
            met.logged_at, met.epoch = now, epoch
        self.log.log(level, line)

    def log_counts(self):
        """One line per cause whose lines were left out: how many workers met it, how often."""
        with self._lock:
            causes = [(key, met) for key, met in self._causes.items()
                      if met.events > met.logged]
        for (tag, verb, reason), met in causes:
            workers = len(met.workers)
            times = f" ({met.events} times)" if met.events != workers else ""
            self.log.log(met.level, f"[{tag}] {workers} worker{'s' if workers != 1 else ''}"
                                    f" {verb}{times}: {reason}")


@dataclass(frozen=True)
class Team:
    """What the workers of one run share: turns, the receivers' health, the stop, the log,
    the flush deadline."""

    turns: SendTurns
    health: ReceiverHealth
    stop: threading.Event
    log: logging.Logger
    timeout: float  # seconds a receiver may stay down before a retry (SERVER_TIMEOUT)
    retries: int  # retries before a worker gives up (CONNECTION_RETRY_ATTEMPTS)
    flush: FlushDeadline  # one for all workers' sockets, from the end of the run
    notices: WorkerNotices  # the workers' [WAIT], [RETRY] and [FAIL] lines, one per cause
    all_reported: object = None  # () -> True once every receiver reported the run


def connect_all(links, stop, within):
    """Connect to every receiver; with several, wait (at most `within` s) for their handshakes.

    PUSH deals only to connected receivers, so without the wait the first to
    connect would take the whole opening burst of a fast run.
    """
    if len(links.endpoints) == 1:
        links.connect_all()
        return
    monitor = links.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        links.connect_all()
        handshakes = 0  # counted, not matched by name: libzmq may name the resolved address
        deadline = time.monotonic() + within
        # Wait for every receiver that is up or not yet judged, not only the first
        # to answer: one that is merely slower would get nothing.
        while time.monotonic() < deadline and not stop.is_set():
            if handshakes >= len(links.health.awaited()):
                return
            if monitor.poll(POLL_INTERVAL // 10):
                monitor_event(monitor)
                handshakes += 1
    finally:
        links.sock.disable_monitor()
        monitor.close(linger=0)


class PushSender:
    """Sends one worker's frames on its PUSH socket, taking turns with the other workers.

    send() and deliver() return None when ZeroMQ took the frame, or the Outcome
    that stopped it. A send that would block waits off turn: as long as it takes
    while the receiver is up but busy (backpressure); `timeout` s and `retries`
    times more while it is down; not at all once every receiver refused us.
    """

    def __init__(self, sock, name, team, tally, links):
        self.name = name
        self.links = links  # this worker's connections, kept in step with the heartbeat
        self.tally = tally
        self.stop = team.stop
        self.health = team.health
        self.log = team.log
        self.timeout = team.timeout
        self.retries = team.retries
        self.notices = team.notices
        self.team = team
        self._end_sent = False  # send_end() dealt the END frame: repeat_end() may repeat it
        self.turn = WorkerTurn(team.turns, team.stop)
        self._sends = 0  # since this worker last let a waiting worker have the turn
        self._sock = sock
        # pyzmq's Socket.send checks for routing_id and group arguments first, which
        # cost a third of a send in bench figure (2) (bench/README.md); PUSH
        # never uses them.
        self._send_now = super(zmq.Socket, sock).send

    @contextlib.contextmanager
    def turn_held(self):
        """Hold the turn to send for the body of the `with` (off it while waiting)."""
        self.turn.take()
        try:
            yield
        finally:
            self.turn.give()

    def send(self, frame, task):
        """Send one task's frame; every TURN_MESSAGES sends, let a waiting worker have a turn."""
        if self.health.changes == self.links.seen and not self.links.paused:
            try:
                self._send_now(frame, zmq.NOBLOCK)
                failure = None
            except zmq.Again:
                failure = self._wait_and_send(frame, task)
        else:  # the heartbeat changed its verdict, or every receiver is down
            failure = self._wait_and_send(frame, task)
        if failure:
            return failure
        self._sends += 1
        if self._sends == TURN_MESSAGES:
            self._sends = 0
            self.turn.share()
        return None

    def send_many(self, frame_of, tasks, max_size):
        """Send the frames of `tasks` (a range; frame_of(task) builds each) while nothing
        needs a wait or a decision; returns the first task not sent (tasks.stop: all were).

        The task it stops at (ZeroMQ would block, the heartbeat changed its verdict or
        paused the links, a frame over `max_size`, the stop) is left to the caller's
        send(), which waits or decides, before it calls send_many() again.
        """
        # The quiet flood's hot path: send()'s checks inline, the sent count and the turn
        # kept once per TURN_MESSAGES and the stop looked at as often; with data()'s one
        # pack, the sender's CPU a message in figure (2) fell from 1.9 to 1.5 µs
        # (bench/README.md, "Profiles", issue 22).
        health, links, send_now, tally = self.health, self.links, self._send_now, self.tally
        task, stop = tasks.start, tasks.stop
        while task < stop and not self.stop.is_set():
            first, last = task, min(stop, task + TURN_MESSAGES - self._sends)
            for task in range(first, last):
                frame = frame_of(task)
                if len(frame) > max_size or health.changes != links.seen or links.paused:
                    break
                try:
                    send_now(frame, zmq.NOBLOCK)
                except zmq.Again:
                    if not self._send_soon(frame):
                        break
            else:
                task = last
            tally.sent += task - first
            self._sends += task - first
            if task < last:
                return task
            if self._sends == TURN_MESSAGES:
                self._sends = 0
                self.turn.share()
        return task

    def _send_soon(self, frame):
        """A flood's frame that met backpressure: sent if ZeroMQ takes it within
        HELD_WAIT_MS, the turn kept meanwhile; False if not (send() then waits off turn)."""
        # Handing the turn over at each backpressure made every worker take its turn to
        # find its socket full: 24 % of the senders' time went in SendTurns.give; with
        # the wait, figure (2) ran 2 % and 8 % faster in two sets of 6 alternating runs
        # (bench/README.md, "Profiles", issue 22).
        if not self._sock.poll(HELD_WAIT_MS, zmq.POLLOUT):
            return False
        try:
            self._send_now(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def deliver(self, frame, task=None):
        """Send a frame outside the task loop (a resend, the END frame: task None)."""
        if self.health.changes == self.links.seen and not self.links.paused:
            try:
                self._send_now(frame, zmq.NOBLOCK)
                return None
            except zmq.Again:
                pass
        return self._wait_and_send(frame, task)

    def send_end(self, end, receivers):
        """An END frame (None: --format text sends none), uncounted, once per receiver: PUSH
        deals consecutive frames in turn, but skips a connection at its high-water mark,
        so with several receivers repeat_end() repeats it until each reported the run.

        Not when every receiver is known down or refused: a receiver not judged yet (a
        short run can end before the heartbeat's first verdict) took the data, and is told.
        """
        if (end is None or not self.tally.sent or self.tally.gave_up() or self.stop.is_set()
                or not self.health.awaited()):
            return
        for _ in range(receivers):
            if self.deliver(end):
                return
        self._end_sent = True

    def repeat_end(self, end, receivers):
        """After send_end(), with several receivers: a round of `receivers` END frames after
        END_REPEAT_INTERVAL, then after twice as long each time (at most END_REPEAT_MAX),
        until every receiver reported the run or the run ended.

        Each END follows this worker's data on whatever connection PUSH deals it to,
        so a receiver that gets one has all of this worker's share before it; one
        whose connection was full when the first round went out gets one of a later
        round, once it has read its backlog. A receiver ignores the copies.
        """
        reported = self.team.all_reported
        if not self._end_sent or receivers < 2 or reported is None:
            return
        interval = END_REPEAT_INTERVAL
        while not self.team.flush.wait_started(interval) and not self.stop.is_set():
            if reported():
                return
            interval = min(2 * interval, END_REPEAT_MAX)
            if self.health.changes != self.links.seen and self.links.follow():
                self.links.settle(self.stop)  # a receiver back: it gets its END too
            for _ in range(receivers):
                try:
                    self._send_now(end, zmq.NOBLOCK)
                except zmq.Again:
                    break  # every connection is full: the next round

    def pause(self, seconds):
        """Wait `seconds` off turn, or less if the stop comes."""
        with self.turn.off():
            self.stop.wait(seconds)

    def finish(self):
        """After the last task: nothing to wait for, ZeroMQ has the frames (see --confirm)."""

    def _wait_and_send(self, frame, task):
        """The slow path: wait off turn until the frame can leave, or give up."""
        with self.turn.off():
            try:
                return self._wait(frame, task)
            finally:
                self.tally.waiting = False

    def _wait(self, frame, task):
        down_since = None
        retries_used = 0
        wait_started = time.monotonic()
        while not self.stop.is_set():
            if self.health.changes != self.links.seen and self.links.follow():
                self.links.settle(self.stop)
            if self.links.paused:  # a silent receiver's connection would take the frame
                self.stop.wait(POLL_S)
            elif self._sock.poll(POLL_INTERVAL, zmq.POLLOUT):
                try:
                    self._sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if self.tally.waiting:
                    self._say(logging.INFO, f"[WAIT] {self.name} resumed after"
                              f" {time.monotonic() - wait_started:.1f} s",
                              ("WAIT", "resumed", "after a wait"))
                return None
            if self.health.all_rejected():
                self._say(logging.ERROR, f"[FAIL] {self.name} gives up: every receiver"
                          " refused this sender's handshake",
                          ("FAIL", "gave up", "every receiver refused this sender's handshake"))
                return Outcome.REJECTED
            now = time.monotonic()
            if self.health.is_up():
                down_since = None  # backpressure: a slow receiver is not a dead one
                if not self.tally.waiting and now - wait_started >= WAIT_LOG_AFTER:
                    self.tally.waiting = True
                    self._say(logging.INFO, f"[WAIT] {self.name} waiting: receiver is up but"
                              " busy (backpressure)",
                              ("WAIT", "waited", "receiver is up but busy (backpressure)"))
                continue
            if not self.tally.waiting:
                self.tally.waiting = True
                self._say(logging.WARNING, f"[WAIT] {self.name} paused: receiver is down",
                          ("WAIT", "paused", "receiver is down"))
            if down_since is None:
                down_since = now
            elif now - down_since >= self.timeout:
                if retries_used >= self.retries:
                    return self._give_up(task, retries_used)
                retries_used += 1
                down_since = now
                self._say(logging.WARNING, f"[RETRY] {self.name}: receiver still down after"
                          f" {self.timeout:g} s, retry {retries_used}/{self.retries}",
                          ("RETRY", "retried", f"receiver still down after {self.timeout:g} s,"
                                               f" retry {retries_used}/{self.retries}"))
        return Outcome.INTERRUPTED

    def _give_up(self, task, retries_used):
        what = f"task {task}" if task is not None else "end-of-run marker"
        down_for = f"receiver down for {self.timeout * (retries_used + 1):g} s"
        self._say(logging.ERROR, f"[FAIL] {self.name} gives up at {what}: {down_for}",
                  ("FAIL", "gave up", down_for))
        return Outcome.RECEIVER_DOWN

    def _say(self, level, line, cause):
        """Log `line` for `cause`, or only count it if another worker just logged it."""
        self.notices.say(level, line, self.name, cause, self.health.changes)
