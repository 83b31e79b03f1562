#!/usr/bin/env python3
"""ZeroMQ PUSH client: NUM_WORKERS threads send tasks; a heartbeat monitor watches the receiver.

Start async-socket-receiver.py first. Every constant below can also be set by a
command-line flag (--help lists them).
"""

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from pushpull import (cli, confirm, flow, latency, links, logs, push, schedule, security,
                      verdict, wire)
from pushpull.health import MONITOR_EVENTS, LinkState, ReceiverHealth, link_change
from pushpull.push import Outcome
from pushpull.threads import POLL_INTERVAL, ServiceThread, join_stopped

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
CONFIRM_PORT = None  # TCP port of each receiver's confirmation channel; None: its port + 1
REPORT_TIMEOUT = 5.0  # seconds to wait after the run for the receivers' reports of it
MAX_LOSS = None  # percent of planned messages a receiver may miss (gate); None: no gate
MAX_P99 = None  # milliseconds of p99 latency the receivers may report (gate); None: no gate
CURVE_CLIENT_KEY = None  # path of this sender's secret certificate; None: no CURVE
CURVE_SERVER_PUBLIC = None  # path of the receiver's public certificate
TARGET_RATE = None  # messages per second across all workers (open loop); None: MESSAGE_DELAY
RUN_DURATION = None  # seconds of schedule to send, instead of MESSAGES_PER_WORKER; None: off
WARMUP = 0.0  # seconds at the start whose messages are kept out of the latency figures
MESSAGE_FORMAT = "binary"  # "binary" (the wire format) or "text" (any text consumer reads it)
CSV_FILE = None  # path of a CSV file with one row per [STATS] interval, or None

RECONNECT_INTERVAL = 100  # milliseconds between reconnection attempts
MIN_RATE, MAX_RATE = 0.001, 10_000_000.0  # msg/s: --rate's range (far beyond what a pair sends)
MAX_REPORT_TIMEOUT = 3600.0  # seconds: the longest --report-timeout (and --max-p99 in ms / 1000)
UNCONFIRMED_LISTED = 10  # workers, and tasks per worker, the summary table lists
UNCONFIRMED_JSON_MAX = 10000  # task numbers per worker the JSON summary lists at most
LOG_BLOCK = 100  # [MSG] lines a worker logs together when it sends without a delay
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt
OPEN_FILES_SPARE = 64  # file descriptors beyond the sockets': log file, CSV, Python's own
SOCKETS_PER_WORKER = 3  # its PUSH, and a monitor pair while it connects to several receivers
RECEIVER_HWM = 200  # messages a receiver buffers per connection (its RECEIVE_HWM): flush bound

GATE_UNITS = {"max-loss": "%", "max-p99": "ms"}  # the unit of each gate's limit and value
EXIT_OK = 0
EXIT_NOT_ALL_SENT = 1
EXIT_BAD_COMMAND_LINE = 2  # as argparse exits for a bad flag
EXIT_INTERRUPTED = 130
FORMATS = {"binary": wire.MessageEncoder, "text": wire.TextEncoder}  # MESSAGE_FORMAT choices
CSV_COLUMNS = ("time_s", "sent", "rate_msg_s", "send_lag_p99_ms", "waiting", "receivers_up")
SECRET_SETTINGS = ("curve_keys",)  # Config fields never written to the JSON summary


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
    confirm_port: "int | None"
    report_timeout: float
    max_loss: "float | None"
    max_p99: "float | None"
    curve_keys: "tuple | None"  # (public, secret, server public), loaded by main
    curve_client_key: "str | None"
    curve_server_public: "str | None"
    generate_keys: "str | None"
    rate: "float | None"
    duration: "float | None"
    warmup: float
    format: str
    csv_path: "str | None"

    @property
    def planned(self):
        """Messages this run plans to send."""
        return self.workers * self.messages

    @property
    def scheduled(self):
        """True when messages have intended send times (--rate or --delay)."""
        return bool(self.rate or self.delay)

    @property
    def target(self):
        """The receiver column of the [MSG] lines."""
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        return f"{len(self.endpoints)} receivers"


def build_parser():
    """The command line: one flag per tuning constant, defaults from the constants."""
    p = argparse.ArgumentParser(
        description="ZeroMQ PUSH sender: worker threads send tasks to a PULL receiver.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=cli.count(1, cli.MAX_WORKERS), default=NUM_WORKERS,
                   help=f"worker threads, at most {cli.MAX_WORKERS} (NUM_WORKERS)")
    add_load_flags(p)
    # SUPPRESS: "append" would add to a default list instead of replacing it.
    p.add_argument("--connect", metavar="ENDPOINT", type=cli.endpoint, action="append",
                   default=argparse.SUPPRESS,
                   help=f"receiver endpoint, repeatable (SERVER_ENDPOINTS) (default:"
                        f" {' '.join(SERVER_ENDPOINTS)})")
    p.add_argument("--timeout", metavar="SECONDS",
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                   default=SERVER_TIMEOUT,
                   help="wait for an absent receiver before a retry; flush bound (SERVER_TIMEOUT)")
    p.add_argument("--retries", type=cli.count(0, cli.MAX_RETRIES),
                   default=CONNECTION_RETRY_ATTEMPTS,
                   help="retries before a worker gives up (CONNECTION_RETRY_ATTEMPTS)")
    p.add_argument("--heartbeat-interval", metavar="SECONDS",
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_HEARTBEAT_INTERVAL),
                   default=HEARTBEAT_INTERVAL, help="receiver health checks (HEARTBEAT_INTERVAL)")
    p.add_argument("--log-file", metavar="PATH",
                   default=LOG_FILE if ENABLE_FILE_LOGGING else None,
                   help="also log to PATH (ENABLE_FILE_LOGGING, LOG_FILE)")
    cli.add_report_flags(p, QUIET, STATS_INTERVAL, JSON_SUMMARY, CSV_FILE)
    p.add_argument("--size", metavar="BYTES", type=cli.count(0, cli.MAX_FRAME_SIZE),
                   default=MESSAGE_SIZE, help="pad each message to at least BYTES (MESSAGE_SIZE)")
    p.add_argument("--max-size", metavar="BYTES", type=cli.count(1, cli.MAX_FRAME_SIZE),
                   default=MAX_MESSAGE_SIZE, help="largest message sent (MAX_MESSAGE_SIZE)")
    p.add_argument("--hwm", metavar="N", type=cli.count(1, cli.MAX_HWM), default=SEND_HWM,
                   help="ZeroMQ send high-water mark per worker (SEND_HWM)")
    p.add_argument("--confirm", action="store_true", default=CONFIRM_DELIVERY,
                   help="resend until every task is confirmed processed (CONFIRM_DELIVERY)")
    p.add_argument("--window", metavar="N", type=cli.count(1, wire.COUNT_MAX),
                   default=CONFIRM_WINDOW,
                   help="unconfirmed messages per worker before it waits (CONFIRM_WINDOW)")
    p.add_argument("--confirm-port", metavar="PORT", type=cli.port,
                   default=CONFIRM_PORT,
                   help="port of the receivers' confirmation channel; default: each receiver's"
                        " port + 1 (CONFIRM_PORT)")
    p.add_argument("--report-timeout", metavar="SECONDS",
                   type=cli.seconds(0, MAX_REPORT_TIMEOUT),
                   default=REPORT_TIMEOUT,
                   help="wait after the run for the receivers' reports (REPORT_TIMEOUT)")
    p.add_argument("--max-loss", metavar="PERCENT", type=cli.number(0, 100, "percent"),
                   default=MAX_LOSS,
                   help="gate: exit 1 unless the receivers got all but PERCENT of the planned"
                        " messages (MAX_LOSS)")
    p.add_argument("--max-p99", metavar="MS",
                   type=cli.number(0, MAX_REPORT_TIMEOUT * 1000, "ms"), default=MAX_P99,
                   help="gate: exit 1 unless the receivers' p99 latency is at most MS (MAX_P99)")
    p.add_argument("--curve-client-key", metavar="FILE", default=CURVE_CLIENT_KEY,
                   help="this sender's secret certificate: turns CURVE on (CURVE_CLIENT_KEY)")
    p.add_argument("--curve-server-public", metavar="FILE", default=CURVE_SERVER_PUBLIC,
                   help="the receiver's public certificate (CURVE_SERVER_PUBLIC)")
    return p


def add_load_flags(p):
    """How much to send and when: count or duration, delay or rate, warmup, format."""
    count = p.add_mutually_exclusive_group()
    count.add_argument("--messages", type=cli.count(0, wire.COUNT_MAX),
                       default=MESSAGES_PER_WORKER, help="messages per worker (MESSAGES_PER_WORKER)")
    count.add_argument("--duration", metavar="SECONDS",
                       type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                       default=RUN_DURATION,
                       help="send what the schedule holds in SECONDS instead (RUN_DURATION)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--delay", metavar="SECONDS", type=cli.seconds(0, cli.MAX_SECONDS),
                      default=MESSAGE_DELAY,
                      help="each worker sends at start + k x SECONDS (MESSAGE_DELAY)")
    pace.add_argument("--rate", metavar="MSG_PER_S",
                      type=cli.number(MIN_RATE, MAX_RATE, "messages per second"),
                      default=TARGET_RATE,
                      help="messages per second across all workers, open loop (TARGET_RATE)")
    p.add_argument("--warmup", metavar="SECONDS", type=cli.seconds(0, cli.MAX_SECONDS),
                   default=WARMUP,
                   help="keep the first SECONDS' messages out of latency figures (WARMUP)")
    p.add_argument("--format", choices=tuple(FORMATS), default=MESSAGE_FORMAT,
                   help="binary wire format, or the seed's text + a readable trailer"
                        " (MESSAGE_FORMAT)")


def parse_args(argv=None):
    """Read the command line into a Config."""
    p = build_parser()
    a = p.parse_args(argv)
    if bool(a.curve_client_key) != bool(a.curve_server_public):
        p.error("CURVE needs both --curve-client-key and --curve-server-public")
    if a.format == "text" and a.confirm:
        p.error("--format text cannot be used with --confirm (a resend needs the binary header)")
    delay = 0.0 if a.rate else a.delay
    messages = a.messages
    if a.duration is not None:
        messages = schedule.messages_for_duration(a.duration, a.workers, a.rate, delay)
        if messages < 1:
            p.error("--duration needs a schedule (--rate, or --delay > 0) that holds at least"
                    " one message per worker")
    if a.workers * messages > cli.MAX_RUN_MESSAGES:
        counted = f"--messages {messages}" if a.duration is None else \
            f"the {messages} messages per worker of --duration"
        p.error(f"--workers {a.workers} x {counted} is more than the"
                f" {cli.MAX_RUN_MESSAGES} messages a run can count")
    cli.check_output_path(p, "--json", a.json)
    cli.check_output_path(p, "--csv", a.csv)
    if a.confirm:
        try:
            for ep in getattr(a, "connect", SERVER_ENDPOINTS):
                confirm.confirm_endpoint(ep, a.confirm_port)
        except ValueError as exc:
            p.error(str(exc))
    return Config(workers=a.workers, messages=messages, delay=delay,
                  endpoints=tuple(getattr(a, "connect", SERVER_ENDPOINTS)), timeout=a.timeout,
                  retries=a.retries, heartbeat_interval=a.heartbeat_interval,
                  log_file=a.log_file, quiet=a.quiet, stats_interval=a.stats_interval,
                  json_path=a.json, size=a.size, max_size=a.max_size, hwm=a.hwm,
                  confirm=a.confirm, window=a.window, confirm_port=a.confirm_port,
                  report_timeout=a.report_timeout, max_loss=a.max_loss, max_p99=a.max_p99,
                  curve_keys=None, curve_client_key=a.curve_client_key,
                  curve_server_public=a.curve_server_public, generate_keys=a.generate_keys,
                  rate=a.rate, duration=a.duration, warmup=a.warmup, format=a.format,
                  csv_path=a.csv)


# ---------------------------------------------------------------------------
# The socket
# ---------------------------------------------------------------------------
def open_push_socket(ctx, config):
    """A PUSH socket with the options every socket here shares; connect it, then send."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.IPV6, cli.wants_ipv6(config.endpoints))
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
    # Messages ZeroMQ accepted get SERVER_TIMEOUT to leave at close (LINGER 0 loses them);
    # a worker sets what is left of the run's flush deadline before it closes.
    sock.setsockopt(zmq.LINGER, int(config.timeout * 1000))
    # Behind a silent cut a connect's SYN is dropped: start a fresh attempt each heartbeat
    # interval, so a heal is seen within one (the kernel would wait up to minutes).
    sock.setsockopt(zmq.CONNECT_TIMEOUT, int(config.heartbeat_interval * 1000))
    links.keep_alive(sock)
    security.apply_client_keys(sock, config.curve_keys)
    return sock


# ---------------------------------------------------------------------------
# Threads: the workers and the heartbeat monitor
# ---------------------------------------------------------------------------
class PushWorker(ServiceThread):
    """The seed's push worker: its own PUSH socket, its tasks in order, then an END frame."""

    def __init__(self, number, ctx, config, run, team, counter, clock, confirmations=None):
        super().__init__(f"Pusher-{number}", team.log)
        self.links = None  # its connections, made by its own thread
        self.number = number
        self.ctx = ctx
        self.config = config
        self.run_info = run
        self.team = team
        self.counter = counter  # numbers the [MSG] lines of all workers
        self.confirmations = confirmations  # None unless --confirm
        self.tally = push.WorkerTally()
        self.schedule = schedule.worker_schedule(clock, number, config.workers, config.rate,
                                                 config.delay, config.warmup)
        # A flood has no schedule; with --warmup its messages are flagged until then.
        self.warmup_until = clock.monotonic + config.warmup
        self.lag = latency.Histogram()  # send lag (ns) of scheduled messages past the warmup
        self.done_sending = threading.Event()  # set once its last frame is handed to ZeroMQ

    def serve(self):
        """Connect, send every task, await confirmations (--confirm), say END; close the
        socket once the run has ended, within the run's one flush deadline."""
        with open_push_socket(self.ctx, self.config) as sock:
            try:
                self.send_all(sock)
            finally:
                self.done_sending.set()
                # Open until every worker is done: then all flush toward one deadline.
                sock.linger = self.team.flush.linger_ms()

    def send_all(self, sock):
        """Connect, send every task, await confirmations (--confirm), say END."""
        config, team = self.config, self.team
        encoder = FORMATS[config.format](self.run_info, self.number, os.getpid(),
                                         threading.get_ident(), config.size)
        self.links = self.new_links(sock, len(encoder.data(0)))
        push.connect_all(self.links, team.stop, within=config.heartbeat_interval)
        sender = self.new_sender(sock)
        with sender.turn_held():
            self.send_tasks(sender, encoder)
        sender.finish()
        self.send_end(sender, encoder)

    def new_links(self, sock, frame_size):
        """The worker's connections, kept in step with the heartbeat. Under --confirm with
        several receivers a silent one is dropped, so its work moves to the live ones;
        plain mode keeps the connection, for TCP to deliver what it holds after a heal."""
        config = self.config
        bound = flow.in_flight_bound(frame_size, config.hwm, RECEIVER_HWM, SOCKET_BUFFER,
                                     SOCKET_BUFFER)
        return links.ReceiverLinks(sock, config.endpoints, self.team.health,
                                   drop=config.confirm and len(config.endpoints) > 1,
                                   linger=config.timeout * (1 + config.retries), bound=bound)

    def new_sender(self, sock):
        """The send path: plain, or holding each frame until confirmed (--confirm)."""
        if self.confirmations is None:
            return push.PushSender(sock, self.name, self.team, self.tally, self.links)
        window = self.confirmations.windows[self.number - 1]
        return confirm.ConfirmingSender(sock, self.name, self.team, self.tally, self.links,
                                        self.confirmations, window)

    def send_tasks(self, sender, encoder):
        """The seed's loop: for each task, wait for its time, build its message, send it, log it."""
        config, tally = self.config, self.tally
        paced = self.schedule is not None
        # Without a pause of 10 ms or more, [MSG] lines are logged in blocks of LOG_BLOCK.
        slow = paced and self.schedule.interval >= 0.01
        lines = None if config.quiet else logs.BlockLog(self.log, 1 if slow else LOG_BLOCK)
        timed = paced or config.warmup > 0
        for task in range(config.messages):
            frame = self.due_frame(sender, encoder, task) if timed else encoder.data(task)
            if self.team.stop.is_set():
                tally.not_sending(range(task, config.messages), Outcome.INTERRUPTED)
                break
            if len(frame) > config.max_size:
                tally.not_sending(range(task, task + 1), Outcome.TOO_LARGE)
                self.log.warning(f"[FAIL] {self.name} task {task}: {len(frame)} bytes is over"
                                 f" the {config.max_size}-byte limit; not sent")
                continue
            failure = sender.send(frame, task)
            if failure:
                tally.not_sending(range(task, config.messages), failure)
                break
            tally.sent += 1
            if lines is not None:
                lines.add(logs.msg_line(next(self.counter), self.name, config.target, task,
                                        encoder.text(task)))
        if lines is not None:
            lines.flush()

    def due_frame(self, sender, encoder, task):
        """Wait (off turn) until the task's intended time, then its frame; record the lag.

        Open loop: a worker that is late sends at once, without waiting, until it
        has caught up; the loop's stop check comes after the wait.
        """
        plan = self.schedule
        if plan is None:  # a flood with --warmup: intended = actual
            warmup = time.monotonic() < self.warmup_until
            return encoder.data_at(task, time.time_ns(), warmup)
        due = plan.due(task)
        late = time.monotonic() - plan.clock.monotonic - due
        if late < 0:
            sender.pause(-late)
            late = time.monotonic() - plan.clock.monotonic - due
        warmup = due < plan.warmup
        if not warmup:
            self.lag.add(int(late * 1e9))
        return encoder.data_at(task, plan.intended_ns(due), warmup)

    def send_end(self, sender, encoder):
        """Best effort, uncounted: an END frame lets each receiver close its share at once."""
        tally, team = self.tally, self.team
        if tally.sent and not tally.gave_up() and not team.stop.is_set() and team.health.is_up():
            end = encoder.end(tally.sent)
            if end is None:  # --format text sends none
                return
            for _ in self.config.endpoints:  # PUSH deals consecutive frames to each in turn
                if sender.deliver(end):
                    break


class HeartbeatMonitor(ServiceThread):
    """Watches each receiver through a probe socket of its own that never sends.

    ZMTP heartbeats find a hung or silently cut-off receiver, the socket monitor
    reports connects and disconnects, and ZMQ_HANDSHAKE_IVL stops a hung listener
    from looking connected. One probe per receiver: its events belong to that
    receiver as the user wrote it, whatever address libzmq resolved (localhost).
    """

    def __init__(self, ctx, config, health, stop, log):
        super().__init__("heartbeat-monitor", log)
        self.ctx = ctx
        self.config = config
        self.health = health
        self.stop = stop

    def serve(self):
        """Connect one probe to each receiver and follow their monitors' events until the stop."""
        with contextlib.ExitStack() as stack:
            monitors = {}
            for endpoint in self.config.endpoints:
                probe = stack.enter_context(open_push_socket(self.ctx, self.config))
                probe.setsockopt(zmq.LINGER, 0)  # it never sends: nothing to flush
                set_heartbeats(probe, self.config.heartbeat_interval)
                monitor = probe.get_monitor_socket(MONITOR_EVENTS)
                stack.callback(monitor.close, linger=0)
                stack.callback(probe.disable_monitor)
                probe.connect(endpoint)
                monitors[monitor] = endpoint
            self.watch(monitors)

    def watch(self, monitors):
        """Turn monitor events into link states; a receiver silent past one interval is down."""
        poller = zmq.Poller()
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        first_verdict = time.monotonic() + self.config.heartbeat_interval
        while not self.stop.is_set():
            for monitor, _ in poller.poll(POLL_INTERVAL):
                event = recv_monitor_message(monitor)
                self.on_event(event["event"], monitors[monitor])
            if time.monotonic() >= first_verdict:
                for endpoint, state in self.health.states.items():
                    if state is LinkState.UNKNOWN:
                        self.transition(endpoint, LinkState.DOWN, "not reachable")

    def on_event(self, event, endpoint):
        """Apply one monitor event to its receiver's link state."""
        state = self.health.states[endpoint]
        change = link_change(event, state, curve=bool(self.config.curve_keys))
        if change:
            self.transition(endpoint, *change)

    def transition(self, endpoint, state, reason):
        """Record a new link state, and log it if it changed."""
        if self.health.set_state(endpoint, state):
            log = {LinkState.UP: self.log.info, LinkState.REJECTED: self.log.error}.get(
                state, self.log.warning)
            log(f"[HEARTBEAT] receiver {endpoint} {state.value}: {reason}")


def open_sub_options(sub, config):
    """The options of a confirmation-channel SUB socket, set before it connects."""
    # ZMTP heartbeats drop a channel whose host died silently; libzmq then reconnects,
    # and subscribes again, when the host is back.
    set_heartbeats(sub, config.heartbeat_interval)
    sub.setsockopt(zmq.IPV6, cli.wants_ipv6(config.endpoints))
    sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL)
    sub.setsockopt(zmq.HANDSHAKE_IVL, int(config.heartbeat_interval * 1000))
    links.keep_alive(sub)
    security.apply_client_keys(sub, config.curve_keys)


def set_heartbeats(sock, interval):
    """ZMTP heartbeats, for the probe and the confirmation channel: they find a hung receiver.

    Data sockets go without: a heartbeat timeout would drop the connection and
    every message queued on it, where a receiver that was only paused (SIGSTOP)
    should get them all once it resumes. libzmq 4.3.5 can also abort when a
    heartbeat fires on a connection stopped at its high-water mark.
    """
    interval_ms = int(interval * 1000)
    # Detection worst case is IVL + TIMEOUT = HEARTBEAT_INTERVAL + 0.5 s.
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, interval_ms // 2))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(50, interval_ms // 2) + 500)
    sock.setsockopt(zmq.HEARTBEAT_TTL, interval_ms * 2)


# ---------------------------------------------------------------------------
# The run and its stop sequence
# ---------------------------------------------------------------------------
def send_run(config, signals, log):
    """Start the monitor and the workers, wait for them, flush, report."""
    run = wire.RunInfo(random.getrandbits(63), config.workers, config.messages,
                       len(config.endpoints), config.confirm, config.scheduled)
    try:
        series = cli.CsvSeries(config.csv_path, CSV_COLUMNS)
    except OSError as exc:
        log.error(f"[EXIT] cannot write --csv {config.csv_path}: {exc.strerror}")
        return EXIT_NOT_ALL_SENT  # cannot start, as for a log file
    health = ReceiverHealth(config.endpoints)
    stop = threading.Event()
    team = push.Team(flow.SendTurns(), health, stop, log, config.timeout, config.retries,
                     flow.FlushDeadline(config.timeout))
    confirmations = (confirm.Confirmations(config.workers, config.window)
                     if config.confirm else None)
    channel = confirm.ConfirmChannel(run.run_id, config.endpoints, config.confirm_port,
                                     confirmations, config.timeout, config.retries)
    started = time.monotonic()
    duration = None
    workers = []
    reports = []
    ctx = zmq.Context()
    # libzmq's default of 1023 sockets is too few for MAX_WORKERS. Each receiver's
    # heartbeat probe and channel SUB need as many as a worker: a socket, a monitor pair.
    ctx.set(zmq.MAX_SOCKETS, SOCKETS_PER_WORKER * (config.workers + 2 * len(config.endpoints)))
    try:
        helpers = [HeartbeatMonitor(ctx, config, health, stop, log),
                   confirm.ConfirmListener(ctx, channel, health,
                                           lambda sub: open_sub_options(sub, config), stop, log)]
        for thread in helpers:
            thread.start()
        channel.wait_settled(config.heartbeat_interval, stop)
        counter = itertools.count(1)
        clock = schedule.Clock.now()
        workers = [PushWorker(n, ctx, config, run, team, counter, clock, confirmations)
                   for n in range(1, config.workers + 1)]
        log.info(f"[START] run {wire.run_label(run.run_id)}: {config.workers} workers x"
                 f" {config.messages} messages{pace_text(config)}"
                 f" -> {', '.join(config.endpoints)}"
                 f" | confirmations and reports from {channel.describe()}")
        for worker in workers:
            worker.start()
        with series:
            wait_for_workers(config, workers, health, signals, stop, log, series)
        duration = time.monotonic() - started  # the run's; the wait for reports is not in it
        reports = wait_for_reports(config, channel, health, signals)
        team.flush.start()  # the run has ended: every worker closes its socket now
        join_stopped(workers, log)
        stop.set()
        join_stopped(helpers, log)
    finally:
        stop.set()  # after an unexpected error: threads let go of their sockets
        team.flush.start()
        flush_result = flush(ctx, config, team.flush, workers)
    verdict_data = receiver_verdict(config, channel, reports)
    if duration is None:  # an unexpected error ended the run early
        duration = time.monotonic() - started
    return report(config, run, workers, health, confirmations, flush_result, verdict_data,
                  duration, signals.first.is_set(), log)


def wait_for_reports(config, channel, health, signals):
    """After the run: the receivers' reports of it, waited for at most REPORT_TIMEOUT."""
    if signals.first.is_set() or not health.is_up():
        return channel.reports()  # Ctrl+C, or no receiver left to report: no waiting
    return channel.wait_for_reports(config.report_timeout, signals.first)


def receiver_verdict(config, channel, reports):
    """The receiver_report JSON: the reports merged, and why any are missing."""
    if not reports:
        return {"receivers": 0, "of": len(config.endpoints), "reason": channel.why_no_report()}
    result = verdict.merge(reports, config.planned)
    result["of"] = len(config.endpoints)
    if len(reports) < len(config.endpoints):
        result["reason"] = f"not every receiver reported: {channel.why_no_report()}"
    result["reports"] = reports
    return result


def pace_text(config):
    """How the run is paced, for the [START] line."""
    text = f", {config.format} format" if config.format != "binary" else ""
    if config.rate:
        text += f", {config.rate:g} msg/s in all (open loop)"
    elif config.delay:
        text += f", every {config.delay:g} s per worker"
    if config.warmup:
        text += f", {config.warmup:g} s warmup"
    return text


def wait_for_workers(config, workers, health, signals, stop, log, series):
    """Wait until every worker is done sending, printing [STATS] (and --csv rows); the
    first Ctrl+C stops them.

    The last CSV row is written once every worker is done: it agrees with the summary.
    """
    started = last_time = time.monotonic()
    last_sent = 0
    for worker in workers:
        while worker.is_alive() and not worker.done_sending.is_set():
            worker.done_sending.wait(POLL_INTERVAL / 1000)
            if signals.first.is_set() and not stop.is_set():
                stop.set()
                log.warning("[STOP] interrupted: stopping workers, flushing what was sent"
                            " (Ctrl+C again to exit at once)")
            now = time.monotonic()
            if now - last_time >= config.stats_interval:
                series.row(csv_row(workers, health, last_sent, now - last_time, now - started))
                line, last_sent = stats_line(config, workers, health, last_sent,
                                             now - last_time, now - started)
                log.info(line)
                last_time = now
    now = time.monotonic()
    series.row(csv_row(workers, health, last_sent, now - last_time, now - started))


def csv_row(workers, health, last_sent, elapsed, total_elapsed):
    """One --csv row (CSV_COLUMNS), counts cumulative since the start."""
    sent = sum(w.tally.sent for w in workers)
    lag = merged_lag(workers)
    return (round(total_elapsed, 3), sent, round(cli.rate(sent - last_sent, elapsed), 1),
            round(lag.percentile(0.99) / 1e6, 3) if lag.count else "",
            sum(1 for w in workers if w.tally.waiting),
            sum(1 for state in health.states.values() if state is LinkState.UP))


def merged_lag(workers):
    """The send lag of every worker, in one histogram."""
    lag = latency.Histogram()
    for worker in workers:
        lag.merge(worker.lag)
    return lag


@dataclass
class FlushResult:
    """Whether every worker's messages left the process before the run's flush deadline."""

    complete: bool
    unflushed_at_most: int
    seconds: float


def flush(ctx, config, deadline, workers):
    """Terminate the context: blocks until every socket's queued messages have left, or
    the flush deadline (SERVER_TIMEOUT from the end of the run) cut them off."""
    ctx.term()
    ended = time.monotonic()
    complete = deadline.met(ended)
    bound = 0 if complete else unflushed_bound(config, workers)
    return FlushResult(complete, bound, ended - deadline.started_at)


def unflushed_bound(config, workers):
    """The most sent messages a flush cut short may have lost: per worker, what its
    connections can hold (flow.in_flight_bound), and never more than it sent."""
    smallest_frame = max(config.size, wire.HEADER_SIZE)
    per_connection = flow.in_flight_bound(smallest_frame, config.hwm, RECEIVER_HWM,
                                          SOCKET_BUFFER, SOCKET_BUFFER)
    per_worker = per_connection * len(config.endpoints)
    return sum(min(worker.tally.sent, per_worker) for worker in workers)


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
def report(config, run, workers, health, confirmations, flush_result, receiver_report,
           duration, interrupted, log):
    """Log the summary table and the gates (and write the JSON); returns the exit status."""
    counts = totals(config, workers)
    confirmation = (confirmation_data(config, workers, confirmations)
                    if confirmations is not None else None)
    data = summary_data(config, run, counts, health, duration, flush_result, confirmation)
    data["receiver_report"] = receiver_report
    data["gates"] = judge_gates(config, receiver_report)
    data["send_lag_ms"] = merged_lag(workers).summary_ms() if config.scheduled else None
    # Under --confirm, `unconfirmed` says what may not have arrived, exactly.
    data["at_risk"] = at_risk(workers) if confirmations is None else 0
    text = summary_table(data)
    if config.scheduled and not config.quiet:
        text += "\n" + "\n".join(merged_lag(workers).text_lines("Send lag"))
    log.info("\n" + text)
    for record in data["gates"]:
        (log.info if record["passed"] else log.error)(
            verdict.gate_line(record, GATE_UNITS[record["name"]]))
    saved = not config.json_path or cli.save_summary(config.json_path, data, log)
    status, reason = exit_reason(counts, config, flush_result, interrupted, confirmation,
                                 data["at_risk"], health, receiver_report)
    if status == EXIT_OK and not saved:
        status, reason = EXIT_NOT_ALL_SENT, "the --json summary could not be written"
    failed_gates = [g["name"] for g in data["gates"] if not g["passed"]]
    if status == EXIT_OK and failed_gates:
        status, reason = EXIT_NOT_ALL_SENT, f"gate failed: {', '.join(failed_gates)}"
    if reason:
        log.error(f"[EXIT] {reason}")
    return status


def judge_gates(config, receiver_report):
    """The JSON `gates`: each gate set on the command line, judged on the receivers' report."""
    gates = [verdict.Gate(name, limit) for name, limit in (("max-loss", config.max_loss),
                                                           ("max-p99", config.max_p99))
             if limit is not None]
    merged = receiver_report if receiver_report["receivers"] else None
    return [gate.judge(merged, f"no report: {receiver_report.get('reason')}") for gate in gates]


def totals(config, workers):
    """Outcome -> count, summed over the workers."""
    result = dict.fromkeys(Outcome, 0)
    for worker in workers:
        result[Outcome.SENT] += worker.tally.sent
        for outcome, count in worker.tally.failed.items():
            result[outcome] += count
        if worker.failed:  # the traceback is in the log; what it had not done is lost
            result[Outcome.WORKER_ERROR] += config.messages - worker.tally.done()
    return result


def at_risk(workers):
    """Messages that may not have arrived: handed to a receiver that went silent and never
    came back, and maybe still in the connection's buffers (ReceiverLinks.episode)."""
    total = sum(w.links.at_risk(w.tally.sent) for w in workers if w.links is not None)
    return min(total, sum(w.tally.sent for w in workers))


def stats_line(config, workers, health, last_sent, elapsed, total_elapsed):
    """One [STATS] line; returns it with the sent count for the next one."""
    counts = totals(config, workers)
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


def unconfirmed_tasks(window, tally):
    """The first UNCONFIRMED_JSON_MAX task numbers a worker never had confirmed, in order."""
    tasks = set(window.frames)
    for unsent in tally.not_sent:
        tasks.update(unsent[:UNCONFIRMED_JSON_MAX])
    return sorted(tasks)[:UNCONFIRMED_JSON_MAX]


def confirmation_data(config, workers, confirmations):
    """--confirm results: what was confirmed, resent, and which tasks never were."""
    confirmed = confirmations.confirmed()
    never = {w.name: unconfirmed_tasks(window, w.tally)
             for w, window in zip(workers, confirmations.windows)}
    return {
        "confirmed": confirmed,
        "resent": confirmations.resent(),
        "unconfirmed": config.planned - confirmed,
        "unconfirmed_tasks": {name: tasks for name, tasks in never.items() if tasks},
    }


def summary_data(config, run, counts, health, duration, flush, confirmation):
    """The final summary, as the JSON written by --json."""
    sent = counts[Outcome.SENT]
    failed = {o.value: n for o, n in counts.items() if o is not Outcome.SENT}
    return {**cli.run_facts(config, SECRET_SETTINGS), **(confirmation or {}),
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
        "target_rate_msg_s": config.rate,
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
    if data["at_risk"]:
        rows.append(("at risk", f"up to {data['at_risk']} sent messages may not have arrived:"
                                " a receiver went silent and never came back"))
    rows.append(("flush", "complete" if data["flush_complete"] else
                 f"TIMED OUT: up to {data['unflushed_at_most']} sent messages may not have"
                 " arrived"))
    rows.append(("duration", f"{data['duration_s']:.2f} s"))
    target = data["target_rate_msg_s"]
    rows.append(("rate", f"{data['sent_per_s']:.1f} msg/s"
                 + (f" (--rate {target:g} msg/s)" if target else "")))
    if data.get("send_lag_ms"):
        lag = data["send_lag_ms"]
        rows.append(("send lag", f"p99 {lag['p99']:.3f} ms, max {lag['max']:.3f} ms"
                                 " (actual - intended send time)"))
    rows.append(("receiver down", f"{data['receiver_down_events']} time(s) during the run"))
    report_data = data["receiver_report"]
    if report_data["receivers"]:
        rows.append(("receiver", verdict.report_line(report_data)))
    if "reason" in report_data:
        rows.append(("receiver" if not report_data["receivers"] else "",
                     f"no report: {report_data['reason']}"))
    if "confirmed" not in data:
        rows.append(("note", "'sent' = accepted by ZeroMQ while the receiver was connected; a"
                             " receiver that dies before reading them loses them (--confirm"
                             " knows)"))
    return cli.format_table("Sender summary", rows)


def exit_reason(counts, config, flush_result, interrupted, confirmation, risk, health,
                receiver_report):
    """Exit status and a one-line reason when not every planned message was sent, or the
    receivers' own report says fewer arrived."""
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
    if risk:
        silent = ", ".join(ep for ep in config.endpoints if health.is_down(ep))
        return EXIT_NOT_ALL_SENT, (f"up to {risk} of {sent} sent messages may not have"
                                   f" arrived: {silent} went silent and never came back")
    if not flush_result.complete:
        return EXIT_NOT_ALL_SENT, (f"flush timed out after {config.timeout:g} s: up to"
                                   f" {flush_result.unflushed_at_most} messages not delivered")
    reported = receiver_report.get("received")
    if receiver_report["receivers"] == len(config.endpoints) and reported < sent:
        # Plain PUSH/PULL cannot know; the receivers can, and they say it did not all arrive
        # (a receiver killed and restarted mid-run reports what its new life received).
        return EXIT_NOT_ALL_SENT, (f"the receivers report {reported} of the {sent} sent"
                                   " messages received")
    return EXIT_OK, None


def open_files_needed(config):
    """File descriptors the run needs: each socket's mailbox, one per connection, spare."""
    sockets = config.workers + 2 * len(config.endpoints) + 2  # workers, probes, SUBs, logs
    return sockets * (1 + len(config.endpoints)) + OPEN_FILES_SPARE


def main(argv=None):
    """Run the workers to the end of the run; returns the exit status."""
    config = parse_args(argv)
    needed = open_files_needed(config)
    allowed = cli.ensure_open_files(needed)
    if allowed is not None and allowed < needed:
        print(f"async-socket-sender: error: --workers {config.workers} with"
              f" {len(config.endpoints)} receiver(s) needs about {needed} open files; this"
              f" process may open {allowed} (raise it with ulimit -n, or use fewer workers)",
              file=sys.stderr)
        return EXIT_BAD_COMMAND_LINE
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


if __name__ == "__main__":
    sys.exit(main())
