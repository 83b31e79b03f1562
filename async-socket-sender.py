#!/usr/bin/env python3
"""ZeroMQ PUSH client: NUM_WORKERS threads send tasks; a heartbeat monitor watches the receiver.

Start async-socket-receiver.py first. Every constant below can also be set by a
command-line flag (--help lists them).
"""

import argparse
import collections
import contextlib
import dataclasses
import enum
import itertools
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from pushpull import cli, confirm, logs, security, wire

# ---------------------------------------------------------------------------
# Constants: edit these to tune a run, or pass the matching flag
# ---------------------------------------------------------------------------
NUM_WORKERS = 20  # worker threads, each with its own PUSH socket
MESSAGES_PER_WORKER = 10  # tasks each worker sends
MESSAGE_DELAY = 0.5  # seconds between a worker's messages
SERVER_ENDPOINTS = ["tcp://localhost:5560"]  # receivers to connect to
SERVER_TIMEOUT = 3.0  # seconds a send waits for an absent receiver before a retry; flush bound
CONNECTION_RETRY_ATTEMPTS = 2  # further waits of SERVER_TIMEOUT before a worker gives up
HEARTBEAT_INTERVAL = 2.0  # seconds; a dead or hung receiver is seen within this + 1 s
ENABLE_FILE_LOGGING = False  # also write the log to LOG_FILE
LOG_FILE = "sender_logs.txt"  # path of the log file when file logging is on
QUIET = False  # True: no per-message lines, only [STATS] and the summary
STATS_INTERVAL = 5.0  # seconds between [STATS] lines
JSON_SUMMARY = None  # path to write the final summary as JSON, or None
MESSAGE_SIZE = 0  # bytes; pad each message to at least this size (0: no padding)
MAX_MESSAGE_SIZE = 1048576  # bytes; larger messages are refused (the receiver would drop them)
SEND_HWM = 1000  # messages ZeroMQ may queue per worker socket (ZMQ_SNDHWM)
CONFIRM_DELIVERY = False  # True: resend until the receiver confirms every task processed
CONFIRM_WINDOW = 1000  # unconfirmed messages one worker may hold before it waits
CURVE_CLIENT_KEY = None  # path of this sender's secret certificate; None: no CURVE
CURVE_SERVER_PUBLIC = None  # path of the receiver's public certificate

POLL_INTERVAL = 100  # milliseconds a thread blocks before it looks at the stop event
RECONNECT_INTERVAL = 100  # milliseconds between reconnection attempts
WAIT_LOG_AFTER = 1.0  # seconds of backpressure before a worker says it is waiting
UNCONFIRMED_LISTED = 10  # workers, and tasks per worker, the summary table lists
UNCONFIRMED_JSON_MAX = 10000  # task numbers per worker the JSON summary lists at most
LOG_BLOCK = 100  # [MSG] lines a worker logs together when it sends without a delay
TURN_MESSAGES = 1000  # messages a worker sends before it lets a waiting worker have a turn
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt

EXIT_OK = 0
EXIT_NOT_ALL_SENT = 1
EXIT_INTERRUPTED = 130
ENDPOINT_PATTERN = re.compile(r"^(tcp|ipc|inproc)://\S+$")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Settings for one sender run."""

    workers: int
    messages: int
    delay: float
    endpoints: tuple
    timeout: float
    retries: int
    heartbeat_interval: float
    log_file: "str | None"
    quiet: bool
    stats_interval: float
    json_path: "str | None"
    size: int
    max_size: int
    hwm: int
    confirm: bool
    window: int
    curve_keys: "tuple | None"  # (public, secret, server public), loaded by main
    curve_client_key: "str | None"
    curve_server_public: "str | None"
    generate_keys: "str | None"

    @property
    def planned(self):
        """Messages this run plans to send."""
        return self.workers * self.messages

    @property
    def target(self):
        """The receiver column of the [MSG] lines."""
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        return f"{len(self.endpoints)} receivers"


def endpoint(text):
    """An argparse type: a ZeroMQ endpoint such as tcp://host:port."""
    if not ENDPOINT_PATTERN.match(text):
        raise ValueError(text)
    return text


def build_parser():
    """The command line: one flag per tuning constant, defaults from the constants."""
    p = argparse.ArgumentParser(
        description="ZeroMQ PUSH sender: worker threads send tasks to a PULL receiver.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=cli.positive(int), default=NUM_WORKERS,
                   help="worker threads (NUM_WORKERS)")
    p.add_argument("--messages", type=cli.non_negative(int), default=MESSAGES_PER_WORKER,
                   help="messages per worker (MESSAGES_PER_WORKER)")
    p.add_argument("--delay", metavar="SECONDS", type=cli.non_negative(float),
                   default=MESSAGE_DELAY, help="pause between a worker's messages (MESSAGE_DELAY)")
    # SUPPRESS: "append" would add to a default list instead of replacing it.
    p.add_argument("--connect", metavar="ENDPOINT", type=endpoint, action="append",
                   default=argparse.SUPPRESS,
                   help=f"receiver endpoint, repeatable (SERVER_ENDPOINTS) (default:"
                        f" {' '.join(SERVER_ENDPOINTS)})")
    p.add_argument("--timeout", metavar="SECONDS", type=cli.positive(float),
                   default=SERVER_TIMEOUT,
                   help="wait for an absent receiver before a retry; flush bound (SERVER_TIMEOUT)")
    p.add_argument("--retries", type=cli.non_negative(int),
                   default=CONNECTION_RETRY_ATTEMPTS,
                   help="retries before a worker gives up (CONNECTION_RETRY_ATTEMPTS)")
    p.add_argument("--heartbeat-interval", metavar="SECONDS", type=cli.positive(float),
                   default=HEARTBEAT_INTERVAL, help="receiver health checks (HEARTBEAT_INTERVAL)")
    p.add_argument("--log-file", metavar="PATH",
                   default=LOG_FILE if ENABLE_FILE_LOGGING else None,
                   help="also log to PATH (ENABLE_FILE_LOGGING, LOG_FILE)")
    cli.add_report_flags(p, QUIET, STATS_INTERVAL, JSON_SUMMARY)
    p.add_argument("--size", metavar="BYTES", type=cli.non_negative(int),
                   default=MESSAGE_SIZE, help="pad each message to at least BYTES (MESSAGE_SIZE)")
    p.add_argument("--max-size", metavar="BYTES", type=cli.positive(int),
                   default=MAX_MESSAGE_SIZE, help="largest message sent (MAX_MESSAGE_SIZE)")
    p.add_argument("--hwm", metavar="N", type=cli.positive(int), default=SEND_HWM,
                   help="ZeroMQ send high-water mark per worker (SEND_HWM)")
    p.add_argument("--confirm", action="store_true", default=CONFIRM_DELIVERY,
                   help="resend until every task is confirmed processed (CONFIRM_DELIVERY)")
    p.add_argument("--window", metavar="N", type=cli.positive(int), default=CONFIRM_WINDOW,
                   help="unconfirmed messages per worker before it waits (CONFIRM_WINDOW)")
    p.add_argument("--curve-client-key", metavar="FILE", default=CURVE_CLIENT_KEY,
                   help="this sender's secret certificate: turns CURVE on (CURVE_CLIENT_KEY)")
    p.add_argument("--curve-server-public", metavar="FILE", default=CURVE_SERVER_PUBLIC,
                   help="the receiver's public certificate (CURVE_SERVER_PUBLIC)")
    return p


def parse_args(argv=None):
    """Read the command line into a Config."""
    p = build_parser()
    a = p.parse_args(argv)
    if bool(a.curve_client_key) != bool(a.curve_server_public):
        p.error("CURVE needs both --curve-client-key and --curve-server-public")
    if a.confirm:
        try:
            for ep in getattr(a, "connect", SERVER_ENDPOINTS):
                confirm.confirm_endpoint(ep)
        except ValueError as exc:
            p.error(str(exc))
    return Config(workers=a.workers, messages=a.messages, delay=a.delay,
                  endpoints=tuple(getattr(a, "connect", SERVER_ENDPOINTS)), timeout=a.timeout,
                  retries=a.retries, heartbeat_interval=a.heartbeat_interval,
                  log_file=a.log_file, quiet=a.quiet, stats_interval=a.stats_interval,
                  json_path=a.json, size=a.size, max_size=a.max_size, hwm=a.hwm,
                  confirm=a.confirm, window=a.window,
                  curve_keys=None, curve_client_key=a.curve_client_key,
                  curve_server_public=a.curve_server_public, generate_keys=a.generate_keys)


# ---------------------------------------------------------------------------
# Outcomes and shared state
# ---------------------------------------------------------------------------
class Outcome(enum.Enum):
    """What became of one planned message."""

    SENT = "sent"  # accepted by ZeroMQ while the receiver was connected
    RECEIVER_DOWN = "receiver_down"  # gave up after SERVER_TIMEOUT x (1 + retries)
    INTERRUPTED = "interrupted"  # Ctrl+C or SIGTERM came first
    TOO_LARGE = "too_large"  # over MAX_MESSAGE_SIZE, refused before sending
    REJECTED = "rejected"  # every receiver refused this sender's CURVE key / address
    WORKER_ERROR = "worker_error"  # the worker thread failed (traceback in the log)


class LinkState(enum.Enum):
    """The heartbeat monitor's view of one receiver endpoint."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    REJECTED = "rejected"  # the receiver refused us: libzmq will not retry


class ReceiverHealth:
    """Written by the heartbeat monitor only; read by workers and main."""

    def __init__(self, endpoints):
        self.states = {ep: LinkState.UNKNOWN for ep in endpoints}
        self.down_transitions = 0
        self._any_up = threading.Event()

    def is_up(self):
        """True while at least one receiver is connected and answering."""
        return self._any_up.is_set()

    def all_rejected(self):
        """True when every receiver refused this sender's handshake."""
        return all(s is LinkState.REJECTED for s in self.states.values())

    def set_state(self, ep, state):
        """Record a new state; returns True when it changed."""
        old = self.states[ep]
        if old is state:
            return False
        self.states[ep] = state
        if state is LinkState.DOWN and old is LinkState.UP:
            self.down_transitions += 1
        if any(s is LinkState.UP for s in self.states.values()):
            self._any_up.set()
        else:
            self._any_up.clear()
        return True

    def describe(self):
        """'up', 'down', or one word per endpoint when there are several."""
        if len(self.states) == 1:
            return next(iter(self.states.values())).value
        return " ".join(f"{ep}={s.value}" for ep, s in self.states.items())


@dataclass
class WorkerTally:
    """One worker's counts; only that worker writes them."""

    sent: int = 0  # a plain int: counted once per message, on the hot path
    failed: dict = field(default_factory=lambda: {o: 0 for o in Outcome if o is not Outcome.SENT})
    waiting: bool = False
    resent: int = 0
    not_sent: list = field(default_factory=list)  # range()s of tasks never handed to ZeroMQ


class UnconfirmedWindow:
    """One worker's sent-but-unconfirmed frames: the worker adds, confirmations remove."""

    def __init__(self, size):
        self.size = size
        self.frames = {}  # task -> frame, in the order sent
        self.confirmed = 0
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


class ConfirmProgress:
    """When any confirmation last arrived, and how many stalls were declared.

    A stall (no confirmation for SERVER_TIMEOUT while a receiver is up) is declared
    once for all workers, so they all resend in the same round: a worker checking
    a moment later would otherwise see the others' resends confirmed and wait a
    whole timeout more.
    """

    def __init__(self):
        self.last = time.monotonic()  # written by the confirm listener
        self.stalls = 0
        self._last_stall = 0.0
        self._lock = threading.Lock()

    def check_stall(self, timeout):
        """Declare a stall if nothing was confirmed for `timeout` s; returns the stall count."""
        with self._lock:
            now = time.monotonic()
            if now - max(self.last, self._last_stall) >= timeout:
                self.stalls += 1
                self._last_stall = now
            return self.stalls


class SendTurns:
    """Lets one worker at a time run its send loop; the others wait for a turn, in order.

    Python runs one thread at a time anyway, and pyzmq lets go of the GIL in every
    send: with fifty workers ready at once, each send woke another worker for
    nothing, and fifty workers sent at a third of the rate of one (bench/). A
    worker holds its turn for at most TURN_MESSAGES messages, and never while it
    waits for the receiver, its delay or its window.
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
        while not gate.acquire(timeout=POLL_INTERVAL / 1000):
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


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------
class HeartbeatMonitor(threading.Thread):
    """Watches each receiver through a probe socket that never sends.

    ZMTP heartbeats find a hung receiver, the socket monitor reports connects and
    disconnects, and ZMQ_HANDSHAKE_IVL stops a hung listener from looking connected.
    """

    def __init__(self, ctx, config, health, log, stop):
        super().__init__(name="heartbeat-monitor", daemon=True)
        self.ctx = ctx
        self.config = config
        self.health = health
        self.log = log
        self.stop = stop

    def run(self):
        """Thread body: any unexpected error is logged with its traceback."""
        try:
            self._watch()
        except Exception:
            self.log.exception("[ERROR] heartbeat monitor failed")

    def _watch(self):
        probe = self.ctx.socket(zmq.PUSH)
        try:
            configure_link(probe, self.config)
            configure_heartbeat(probe, self.config)
            monitor = probe.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            try:
                for ep in self.config.endpoints:
                    probe.connect(ep)
                self._loop(monitor)
            finally:
                probe.disable_monitor()
                monitor.close(linger=0)
        finally:
            probe.close(linger=0)

    def _loop(self, monitor):
        first_verdict = time.monotonic() + self.config.heartbeat_interval
        while not self.stop.is_set():
            if monitor.poll(POLL_INTERVAL):
                event = recv_monitor_message(monitor)
                self._on_event(event["event"], event["endpoint"].decode())
            if time.monotonic() >= first_verdict:
                for ep, state in self.health.states.items():
                    if state is LinkState.UNKNOWN:
                        self._transition(ep, LinkState.DOWN, "not reachable")

    def _on_event(self, event, ep):
        state = self.health.states.get(ep)
        if state is None:
            return
        if state is LinkState.REJECTED and event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return  # the refusal stands until a handshake succeeds
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._transition(ep, LinkState.UP, "connected")
        elif event == zmq.EVENT_DISCONNECTED:
            self._transition(ep, LinkState.DOWN, "connection lost or heartbeat timed out")
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self._transition(ep, LinkState.DOWN, "not reachable")
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            # libzmq does not reconnect after these: waiting would be in vain.
            self._transition(ep, LinkState.REJECTED,
                             "refused our CURVE key or address" if event ==
                             zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                             "handshake refused (CURVE on one side only?)")
        elif self.config.curve_keys:
            # A wrong server key fails every handshake while libzmq retries forever.
            self._transition(ep, LinkState.REJECTED,
                             "CURVE handshake failed (wrong --curve-server-public?)")
        else:
            self._transition(ep, LinkState.DOWN, f"handshake failed ({zmq.Event(event).name})")

    def _transition(self, ep, state, reason):
        if self.health.set_state(ep, state):
            log = self.log.info if state is LinkState.UP else self.log.warning
            if state is LinkState.REJECTED:
                log = self.log.error
            log(f"[HEARTBEAT] receiver {ep} {state.value}: {reason}")


def configure_link(sock, config):
    """Options every PUSH socket here shares: no silent queueing, no fake connections."""
    # Queue only toward a connected receiver, never toward an absent one.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    # A hung listener's port still accepts TCP; without a handshake limit it
    # would look connected for 30 s after a reconnect.
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.heartbeat_interval * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL)
    sock.setsockopt(zmq.SNDHWM, config.hwm)
    # Loopback may otherwise buffer megabytes per connection in the kernel: "sent"
    # would then run far ahead of a slow receiver, with no backpressure felt.
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    configure_curve(sock, config)


def configure_curve(sock, config):
    """CURVE client keys, when the run uses CURVE."""
    if config.curve_keys:
        public, secret, server_public = config.curve_keys
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public


def configure_heartbeat(sock, config):
    """ZMTP heartbeats, for the probe socket only: they find a hung receiver.

    Data sockets go without: a heartbeat timeout would drop the connection and
    every message queued on it, where a receiver that was only paused (SIGSTOP)
    should get them all once it resumes. libzmq 4.3.5 can also abort when a
    heartbeat fires on a connection stopped at its high-water mark.
    """
    interval_ms = int(config.heartbeat_interval * 1000)
    # Detection worst case is IVL + TIMEOUT = HEARTBEAT_INTERVAL + 0.5 s.
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, interval_ms // 2))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(50, interval_ms // 2) + 500)
    sock.setsockopt(zmq.HEARTBEAT_TTL, interval_ms * 2)


class ConfirmListener(threading.Thread):
    """Subscribes to each receiver's confirmations for this run and empties the windows."""

    def __init__(self, ctx, config, run, windows, progress, log, stop):
        super().__init__(name="confirm-listener", daemon=True)
        self.ctx = ctx
        self.config = config
        self.run_info = run
        self.windows = windows
        self.progress = progress
        self.log = log
        self.stop = stop

    def run(self):
        """Thread body: any unexpected error is logged with its traceback."""
        try:
            self._listen()
        except Exception:
            self.log.exception("[ERROR] confirm listener failed")

    def _listen(self):
        sub = self.ctx.socket(zmq.SUB)
        try:
            configure_curve(sub, self.config)
            sub.setsockopt(zmq.SUBSCRIBE, confirm.CONFIRM_TOPIC.pack(self.run_info.run_id))
            for ep in self.config.endpoints:
                sub.connect(confirm.confirm_endpoint(ep))
            windows = self.windows
            while not self.stop.is_set():
                if not sub.poll(POLL_INTERVAL):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 2:
                    continue  # not a confirmation [topic, ranges]: nothing to confirm
                for worker, first, count in confirm.decode_confirmations(frames[1]):
                    if 1 <= worker <= len(windows) and windows[worker - 1].confirm(first, count):
                        self.progress.last = time.monotonic()
        finally:
            sub.close(linger=0)


class PushWorker(threading.Thread):
    """Sends one worker's tasks on its own PUSH socket, then flushes and closes it."""

    def __init__(self, ctx, config, run, number, health, log, stop, counter, turns,
                 window=None, progress=None):
        super().__init__(name=f"Pusher-{number}", daemon=True)
        self.turns = turns
        self._gate = threading.Lock()
        self._gate.acquire()  # released by the worker that hands us the turn
        self._has_turn = False
        self.window = window  # None unless --confirm
        self.progress = progress
        self._downs_seen = 0
        self._stalls_seen = 0
        self.ctx = ctx
        self.config = config
        self.run_info = run
        self.number = number
        self.health = health
        self.log = log
        self.stop = stop
        self.counter = counter
        self.tally = WorkerTally()

    def run(self):
        """Thread body: an unexpected error counts the unsent tasks and logs the traceback."""
        try:
            self._send_all()
        except Exception:
            self.log.exception(f"[ERROR] {self.name} failed")
            done = self.tally.sent + sum(self.tally.failed.values())
            self.tally.failed[Outcome.WORKER_ERROR] += self.config.messages - done

    def _send_all(self):
        config = self.config
        sock = self.ctx.socket(zmq.PUSH)
        # pyzmq's Socket.send checks for routing_id and group arguments first, which
        # cost a third of a send here; PUSH never uses them.
        self._send_now = super(zmq.Socket, sock).send
        try:
            configure_link(sock, config)
            # Messages ZeroMQ accepted get SERVER_TIMEOUT to leave at close (LINGER 0 loses them).
            sock.setsockopt(zmq.LINGER, int(config.timeout * 1000))
            if len(config.endpoints) > 1:
                self._connect_all(sock)
            else:
                sock.connect(config.endpoints[0])
            sent = self._send_tasks(sock)
            gave_up = any(self.tally.failed[o] for o in (Outcome.RECEIVER_DOWN, Outcome.REJECTED))
            if sent and not gave_up and not self.stop.is_set() and self.health.is_up():
                # Best effort, uncounted: lets each receiver close its share of the run
                # at once. PUSH deals consecutive frames to consecutive receivers.
                end = self._encoder.end(sent)
                for _ in config.endpoints:
                    if self._send(sock, end, None) is not Outcome.SENT:
                        break
        finally:
            sock.close()

    def _connect_all(self, sock):
        """Connect to every receiver and wait (bounded) for each live one to shake hands.

        PUSH deals only to connected receivers, so without the wait the first to
        connect would take the whole opening burst of a fast run.
        """
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            for ep in self.config.endpoints:
                sock.connect(ep)
            connected = set()
            deadline = time.monotonic() + self.config.heartbeat_interval
            while time.monotonic() < deadline and not self.stop.is_set():
                # Wait for every receiver that is up or not yet judged, not only the
                # first to answer: one that is merely slower would get nothing.
                awaited = {ep for ep, st in self.health.states.items()
                           if st in (LinkState.UP, LinkState.UNKNOWN)}
                if not awaited - connected:
                    return
                if monitor.poll(POLL_INTERVAL // 10):
                    connected.add(recv_monitor_message(monitor)["endpoint"].decode())
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    def _send_tasks(self, sock):
        config = self.config
        encoder = self._encoder = wire.MessageEncoder(
            self.run_info, self.number, os.getpid(), threading.get_ident(), config.size)
        # Without a delay, [MSG] lines are logged in blocks of LOG_BLOCK: one log
        # record per line would cost more than sending the message.
        lines = None if config.quiet else logs.LineBlock()
        block = LOG_BLOCK if not config.delay else 1
        self._take_turn()
        try:
            self._send_loop(sock, encoder, lines, block)
        finally:
            self._give_turn()
        if self.window is not None:
            self._await_confirmations(sock)
        return self.tally.sent

    def _send_loop(self, sock, encoder, lines, block):
        config = self.config
        tally = self.tally
        outcomes = tally.failed
        sent_ok = Outcome.SENT
        window = self.window
        send_now, no_block = self._send_now, int(zmq.NOBLOCK)
        for task in range(config.messages):
            if self.stop.is_set():
                outcomes[Outcome.INTERRUPTED] += config.messages - task
                self.tally.not_sent.append(range(task, config.messages))
                break
            if task and task % TURN_MESSAGES == 0 and self.turns.waiting():
                self._give_turn()
                self._take_turn()
            if window is not None:
                outcome = self._make_room(sock)
                if outcome is not Outcome.SENT:
                    outcomes[outcome] += config.messages - task
                    self.tally.not_sent.append(range(task, config.messages))
                    break
            frame = encoder.data(task)
            if len(frame) > config.max_size:
                outcomes[Outcome.TOO_LARGE] += 1
                self.tally.not_sent.append(range(task, task + 1))
                self.log.warning(f"[FAIL] {self.name} task {task}: {len(frame)} bytes is over"
                                 f" the {config.max_size}-byte limit; not sent")
                continue
            if window is not None:
                window.add(task, frame)  # before sending: its confirmation may come at once
            try:
                send_now(frame, no_block)  # _send()'s first step, without the call
                outcome = sent_ok
            except zmq.Again:
                outcome = self._send(sock, frame, task)
            if outcome is sent_ok:
                tally.sent += 1
                if lines is not None:
                    lines.append(logs.msg_line(next(self.counter), self.name,
                                                   config.target, task, encoder.text(task)))
                    if len(lines) >= block:
                        self.log.info(lines)
                        lines = logs.LineBlock()
            else:
                if window is not None:
                    window.discard(task)
                outcomes[outcome] += config.messages - task
                self.tally.not_sent.append(range(task, config.messages))
                break
            if config.delay:
                with self._off_turn():
                    self.stop.wait(config.delay)  # the loop's stop check counts what is left
        if lines:
            self.log.info(lines)

    def _take_turn(self):
        self._has_turn = self.turns.take(self._gate, self.stop)

    def _give_turn(self):
        if self._has_turn:
            self._has_turn = False
            self.turns.give()

    @contextlib.contextmanager
    def _off_turn(self):
        """Let other workers send while this one waits (a no-op outside a turn)."""
        if not self._has_turn:
            yield
            return
        self._give_turn()
        yield  # an error leaves without the turn: nobody waits for it behind the queue
        self._take_turn()

    def _make_room(self, sock):
        """--confirm: wait until the window has room, resending when a receiver was lost."""
        if len(self.window) < self.window.size and \
                self.health.down_transitions == self._downs_seen:
            return Outcome.SENT  # the common case, on the hot path: nothing to wait for
        with self._off_turn():
            return self._wait_for_room(sock)

    def _wait_for_room(self, sock):
        waited = False
        while not self.window.wait_for_room(POLL_INTERVAL / 1000):
            if self.stop.is_set():
                return Outcome.INTERRUPTED
            outcome = self._resend_if_lost(sock)
            if outcome is not Outcome.SENT:
                return outcome
            if not waited:
                waited = True
                self.log.info(f"[WAIT] {self.name} waiting: {len(self.window)} messages"
                              " unconfirmed, window full (backpressure)")
        return self._resend_if_lost(sock)

    def _await_confirmations(self, sock):
        """--confirm: after the last task, wait until every sent task is confirmed."""
        window = self.window
        while len(window) and not self.stop.is_set():
            if self.health.all_rejected():
                return
            if self._resend_if_lost(sock) is not Outcome.SENT:
                return
            window.wait_for_change(POLL_INTERVAL / 1000)

    def _resend_if_lost(self, sock):
        """Resend every unconfirmed task after a receiver went down, or when confirmations stall.

        A receiver that dies takes what it had not processed with it; a confirmation
        can be missed. Resent tasks it did process are dropped as duplicates.
        """
        downs = self.health.down_transitions
        if not len(self.window):
            self._stalls_seen = self.progress.stalls  # nothing of ours a stall could concern
        stalls = self._stalls_seen
        if len(self.window) and self.health.is_up():
            stalls = self.progress.check_stall(self.config.timeout)
        stalled = stalls != self._stalls_seen
        if downs == self._downs_seen and not stalled:
            return Outcome.SENT
        self._downs_seen, self._stalls_seen = downs, stalls
        pending = self.window.unconfirmed()
        if pending:
            why = "a receiver went down" if not stalled else "confirmations stalled"
            self.log.warning(f"[RESEND] {self.name}: {why}; resending {len(pending)}"
                             " unconfirmed messages")
        for task, frame in pending:
            outcome = self._send(sock, wire.mark_resent(frame), task)
            if outcome is not Outcome.SENT:
                return outcome
            self.tally.resent += 1
        return Outcome.SENT

    def _send(self, sock, frame, task):
        """Send one frame; wait while the receiver is busy, give up after it stays down."""
        try:
            self._send_now(frame, zmq.NOBLOCK)
            return Outcome.SENT
        except zmq.Again:
            pass
        with self._off_turn():
            return self._wait_and_send(sock, frame, task)

    def _wait_and_send(self, sock, frame, task):
        config = self.config
        down_since = None
        retries_used = 0
        wait_started = time.monotonic()
        try:
            while not self.stop.is_set():
                if sock.poll(POLL_INTERVAL, zmq.POLLOUT):
                    try:
                        sock.send(frame, zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    if self.tally.waiting:
                        self.log.info(f"[WAIT] {self.name} resumed after"
                                      f" {time.monotonic() - wait_started:.1f} s")
                    return Outcome.SENT
                now = time.monotonic()
                if self.health.all_rejected():
                    self.log.error(f"[FAIL] {self.name} gives up: every receiver refused"
                                   " this sender's handshake")
                    return Outcome.REJECTED
                if self.health.is_up():
                    down_since = None  # backpressure: a slow receiver is not a dead one
                    if not self.tally.waiting and now - wait_started >= WAIT_LOG_AFTER:
                        self.tally.waiting = True
                        self.log.info(f"[WAIT] {self.name} waiting: receiver is up but busy"
                                      " (backpressure)")
                    continue
                if not self.tally.waiting:
                    self.tally.waiting = True
                    self.log.warning(f"[WAIT] {self.name} paused: receiver is down")
                if down_since is None:
                    down_since = now
                elif now - down_since >= config.timeout:
                    if retries_used >= config.retries:
                        what = f"task {task}" if task is not None else "end-of-run marker"
                        self.log.error(f"[FAIL] {self.name} gives up at {what}: receiver down"
                                       f" for {config.timeout * (retries_used + 1):g} s")
                        return Outcome.RECEIVER_DOWN
                    retries_used += 1
                    down_since = now
                    self.log.warning(f"[RETRY] {self.name}: receiver still down after"
                                     f" {config.timeout:g} s, retry {retries_used}"
                                     f"/{config.retries}")
            return Outcome.INTERRUPTED
        finally:
            self.tally.waiting = False


# ---------------------------------------------------------------------------
# Summary and main
# ---------------------------------------------------------------------------
def totals(workers):
    """Outcome -> count, summed over the workers."""
    result = {o: 0 for o in Outcome}
    for worker in workers:
        result[Outcome.SENT] += worker.tally.sent
        for outcome, count in worker.tally.failed.items():
            result[outcome] += count
    return result


def stats_line(config, workers, health, last_sent, elapsed, total_elapsed):
    """One [STATS] line; returns it with the sent count for the next one."""
    counts = totals(workers)
    sent = counts[Outcome.SENT]
    failed = sum(counts.values()) - sent
    recent = cli.rate(sent - last_sent, elapsed)
    remaining = config.planned - sent - failed
    overall = cli.rate(sent, total_elapsed)
    eta = f"{remaining / overall:.1f} s" if overall > 0 else "-"
    waiting = sum(1 for w in workers if w.tally.waiting)
    return (f"[STATS] sent {sent}/{config.planned} ({100 * sent / max(1, config.planned):.1f}%)"
            f" | {recent:.1f} msg/s | failed {failed} | waiting {waiting}"
            f" | receiver {health.describe()} | ETA {eta}"), sent


def unconfirmed_tasks(worker):
    """The first UNCONFIRMED_JSON_MAX task numbers a worker never had confirmed, in order."""
    tasks = sorted(worker.window.frames)
    for unsent in worker.tally.not_sent:
        tasks.extend(unsent[:UNCONFIRMED_JSON_MAX])
    return sorted(set(tasks))[:UNCONFIRMED_JSON_MAX]


def confirmation_data(config, workers):
    """--confirm results: what was confirmed, resent, and which tasks never were."""
    confirmed = sum(w.window.confirmed for w in workers)
    never = {w.name: unconfirmed_tasks(w) for w in workers}
    return {
        "confirmed": confirmed,
        "resent": sum(w.tally.resent for w in workers),
        "unconfirmed": config.planned - confirmed,
        "unconfirmed_tasks": {name: tasks for name, tasks in never.items() if tasks},
    }


def summary_data(config, run, counts, health, duration, flush, confirmation):
    """The final summary, as the JSON written by --json."""
    sent = counts[Outcome.SENT]
    failed = {o.value: n for o, n in counts.items() if o is not Outcome.SENT}
    return {**(confirmation or {}),
        "run_id": wire.run_label(run.run_id),
        "planned": config.planned,
        "sent": sent,
        "failed": sum(failed.values()),
        "failed_by_reason": failed,
        "flush_complete": flush.complete,
        "unflushed_at_most": flush.unflushed_at_most,
        "flush_s": round(flush.seconds, 3),
        "receiver_down_events": health.down_transitions,
        "endpoints": list(config.endpoints),
        "workers": config.workers,
        "duration_s": round(duration, 3),
        "sent_per_s": round(cli.rate(sent, duration), 1),
    }


def summary_table(data):
    """The aligned table printed at exit."""
    rows = [("run", data["run_id"]), ("planned", data["planned"]), ("sent", data["sent"]),
            ("failed", data["failed"])]
    rows += [(f"  {reason}", n) for reason, n in data["failed_by_reason"].items() if n]
    if "confirmed" in data:
        rows.append(("confirmed", f"{data['confirmed']}/{data['planned']} processed by a"
                                  " receiver (--confirm)"))
        rows.append(("resent", data["resent"]))
        rows.append(("unconfirmed", data["unconfirmed"]))
        for name, tasks in list(data["unconfirmed_tasks"].items())[:UNCONFIRMED_LISTED]:
            shown = ", ".join(map(str, tasks[:UNCONFIRMED_LISTED]))
            more = f" ... +{len(tasks) - UNCONFIRMED_LISTED}" if len(tasks) > UNCONFIRMED_LISTED \
                else ""
            rows.append((f"  {name}", f"tasks {shown}{more}"))
        if len(data["unconfirmed_tasks"]) > UNCONFIRMED_LISTED:
            rows.append(("  ...", f"{len(data['unconfirmed_tasks'])} workers in all (see --json)"))
    rows.append(("flush", "complete" if data["flush_complete"] else
                 f"TIMED OUT: up to {data['unflushed_at_most']} queued messages discarded"))
    rows.append(("duration", f"{data['duration_s']:.2f} s"))
    rows.append(("rate", f"{data['sent_per_s']:.1f} msg/s"))
    rows.append(("receiver down", f"{data['receiver_down_events']} time(s) during the run"))
    if "confirmed" not in data:
        rows.append(("note", "'sent' = accepted by ZeroMQ while the receiver was connected; a"
                             " receiver that dies before reading them loses them (--confirm"
                             " knows)"))
    return cli.format_table("Sender summary", rows)


@dataclass
class FlushResult:
    """Whether closing the context flushed every queued message in time."""

    complete: bool
    unflushed_at_most: int
    seconds: float


def flush(ctx, config, counts):
    """Terminate the context: blocks until queued messages leave, at most SERVER_TIMEOUT."""
    started = time.monotonic()
    ctx.term()
    seconds = time.monotonic() - started
    # Every socket lingers at most SERVER_TIMEOUT; a term that took that long hit the limit.
    complete = seconds < config.timeout - 0.05
    bound = 0 if complete else min(counts[Outcome.SENT], config.workers * config.hwm)
    return FlushResult(complete, bound, seconds)


def exit_reason(counts, config, flush_result, interrupted, confirmation):
    """Exit status and a one-line reason when not every planned message was sent."""
    sent = counts[Outcome.SENT]
    if interrupted:
        return EXIT_INTERRUPTED, f"interrupted: {sent} of {config.planned} messages sent"
    if confirmation is not None:
        if confirmation["confirmed"] < config.planned:
            return EXIT_NOT_ALL_SENT, (f"only {confirmation['confirmed']} of {config.planned}"
                                       " messages confirmed processed; see unconfirmed tasks")
        return EXIT_OK, None
    if sent < config.planned:
        reasons = ", ".join(f"{n} {o.value}" for o, n in counts.items()
                            if n and o is not Outcome.SENT)
        return EXIT_NOT_ALL_SENT, f"only {sent} of {config.planned} messages sent ({reasons})"
    if not flush_result.complete:
        return EXIT_NOT_ALL_SENT, (f"flush timed out after {config.timeout:g} s: up to"
                                   f" {flush_result.unflushed_at_most} messages not delivered")
    return EXIT_OK, None


def main(argv=None):
    """Run the workers to the end of the run; returns the exit status."""
    config = parse_args(argv)
    if config.curve_client_key:
        try:
            public, secret = security.load_secret_certificate(config.curve_client_key)
            server_public = security.load_public_key(config.curve_server_public)
        except security.KeyFileError as exc:
            print(f"async-socket-sender: {exc}", file=sys.stderr)
            return EXIT_NOT_ALL_SENT
        config = dataclasses.replace(config, curve_keys=(public, secret, server_public))
    return cli.run_script("async-socket-sender", config, send_run, EXIT_NOT_ALL_SENT,
                               exit_on_second=True)


def send_run(config, signals, log):
    """Start the monitor and the workers, wait for them, flush, report."""
    run = wire.RunInfo(random.getrandbits(63), config.workers, config.messages,
                           len(config.endpoints), config.confirm)
    health = ReceiverHealth(config.endpoints)
    stop = threading.Event()
    started = time.monotonic()
    workers = []
    ctx = zmq.Context()
    try:
        monitor = HeartbeatMonitor(ctx, config, health, log, stop)
        monitor.start()
        counter = itertools.count(1)
        turns = SendTurns()
        progress = ConfirmProgress()
        windows = [UnconfirmedWindow(config.window) if config.confirm else None
                   for _ in range(config.workers)]
        listener = None
        if config.confirm:
            listener = ConfirmListener(ctx, config, run, windows, progress, log, stop)
            listener.start()
        workers = [PushWorker(ctx, config, run, n, health, log, stop, counter, turns,
                              windows[n - 1], progress)
                   for n in range(1, config.workers + 1)]
        log.info(f"[START] run {wire.run_label(run.run_id)}: {config.workers} workers x"
                 f" {config.messages} messages -> {', '.join(config.endpoints)}")
        for worker in workers:
            worker.start()
        wait_for_workers(config, workers, health, signals, stop, log)
        stop.set()
        monitor.join()
        if listener is not None:
            listener.join()
    finally:
        stop.set()  # after an unexpected error: threads let go of their sockets
        flush_result = flush(ctx, config, totals(workers))
    counts = totals(workers)
    duration = time.monotonic() - started
    confirmation = confirmation_data(config, workers) if config.confirm else None
    data = summary_data(config, run, counts, health, duration, flush_result, confirmation)
    log.info("\n" + summary_table(data))
    if config.json_path:
        cli.write_json(config.json_path, data)
    status, reason = exit_reason(counts, config, flush_result, signals.first.is_set(),
                                 confirmation)
    if reason:
        log.error(f"[EXIT] {reason}")
    return status


def wait_for_workers(config, workers, health, signals, stop, log):
    """Join the workers, printing [STATS]; the first Ctrl+C stops them, the second exits."""
    started = last_time = time.monotonic()
    last_sent = 0
    for worker in workers:
        while worker.is_alive():
            worker.join(POLL_INTERVAL / 1000)
            if signals.first.is_set() and not stop.is_set():
                stop.set()
                log.warning("[STOP] interrupted: stopping workers, flushing what was sent"
                            " (Ctrl+C again to exit at once)")
            now = time.monotonic()
            if now - last_time >= config.stats_interval:
                line, last_sent = stats_line(config, workers, health, last_sent,
                                             now - last_time, now - started)
                log.info(line)
                last_time = now


if __name__ == "__main__":
    sys.exit(main())
