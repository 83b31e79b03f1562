#!/usr/bin/env python3
"""ZeroMQ PUSH client: NUM_WORKERS threads send tasks; a heartbeat monitor watches the receiver.

Start async-socket-receiver.py first. Every constant below can also be set by a
command-line flag (--help lists them).
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

import zmq

from pushpull import (channel, cli, findmax, hlog, instances, latency, links, listener, logs,
                      metrics, processes, push, schedule, security, sendflow, sender_summary,
                      verdict, windows, wire)
from pushpull.health import (MONITOR_EVENTS, LinkState, ReceiverHealth, link_change,
                             monitor_event, set_heartbeats)
from pushpull.push import Outcome
from pushpull.sender_summary import SenderExit
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
CONFIRM_TIMEOUT = 120.0  # seconds a worker waits for confirmations after its last send (--confirm)
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
NUM_INSTANCES = 1  # sender instances (processes, hosts) sharing one run (docs/many-hosts.md)
INSTANCE_INDEX = 0  # this instance, 0 to NUM_INSTANCES - 1
RUN_NAME = None  # the shared run's ID (--run-id), required when NUM_INSTANCES > 1
START_AT = None  # when the run's schedule starts (--start-at): None, at once
NUM_PROCESSES = 1  # instances of one run started as child processes of this one
FIND_MAX = False  # True: search the highest rate within the gates (docs/find-max.md)
FIND_MAX_START_RATE = 1000.0  # messages per second of the search's first step without --rate
STEP_DURATION = 10.0  # seconds each search step sends, after WARMUP
FIND_MAX_PRECISION = 5.0  # percent between the rates that held and failed where a search stops
METRICS_PORT = None  # TCP port of the Prometheus endpoint (/metrics), or None: no endpoint
METRICS_BIND = "127.0.0.1"  # address the metrics endpoint listens on; "*": every interface
METRICS_HOLD = 5.0  # seconds at exit the final figures wait for a scrape (with METRICS_PORT)
HLOG_FILE = None  # path of an HdrHistogram log: send lag per [STATS] interval, or None

LOG_BLOCK = 100  # [MSG] lines a worker logs together when it sends without a delay
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt
OPEN_FILES_SPARE = 64  # file descriptors beyond the sockets': log file, CSV, Python's own
SOCKETS_PER_WORKER = 3  # its PUSH, and a monitor pair while it connects to several receivers
RECEIVER_HWM = 200  # messages a receiver buffers per connection (its RECEIVE_HWM): flush bound

FORMATS = {"binary": wire.MessageEncoder, "text": wire.TextEncoder}  # MESSAGE_FORMAT choices


# ---------------------------------------------------------------------------
# The socket
# ---------------------------------------------------------------------------
def open_push_socket(ctx, config):
    """A PUSH socket with the options every socket here shares; connect it, then send."""
    sock = ctx.socket(zmq.PUSH)
    links.set_link_options(sock, config)  # IPv6, handshake limit, reconnect, keepalive, CURVE
    # Queue only toward a connected receiver, never toward an absent one.
    sock.setsockopt(zmq.IMMEDIATE, 1)
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
        self.clock = clock
        self.schedule = schedule.worker_schedule(clock, number, run.workers, config.rate,
                                                 config.delay, config.warmup)
        # A flood has no schedule; with --warmup its messages are flagged until then.
        self.warmup_until = clock.monotonic + config.warmup
        self.lag = latency.Histogram()  # send lag (ns) of scheduled messages past the warmup
        self.due_lag = None  # the lag of the message due now (due_frame), until it is sent
        self.done_sending = threading.Event()  # set once its last frame is handed to ZeroMQ
        self.sent_until = None  # time.monotonic() after its last task: --find-max's rate

    def serve(self):
        """Connect, send every task, await confirmations (--confirm), say END; close the
        socket once the run has ended, within the run's one flush deadline."""
        config = self.config
        with open_push_socket(self.ctx, config) as sock:
            try:
                encoder = FORMATS[config.format](self.run_info, self.number, os.getpid(),
                                                 threading.get_ident(), config.size)
                self.links = self.new_links(sock)
                push.connect_all(self.links, self.team.stop, within=config.heartbeat_interval)
                sender = self.new_sender(sock)
                with sender.turn_held():
                    self.send_tasks(sender, encoder)
                sender.finish()
                end = encoder.end(self.tally.sent)
                sender.send_end(end, len(config.endpoints))
                self.done_sending.set()
                sender.repeat_end(end, len(config.endpoints))
            finally:
                self.done_sending.set()
                # Open until every worker is done: then all flush toward one deadline.
                sock.linger = self.team.flush.linger_ms()

    def new_links(self, sock):
        """The worker's connections, kept in step with the heartbeat. With several
        receivers a silent one is dropped, so the live ones take the work; a lone one's
        connection is kept, for TCP to deliver what it holds after a heal."""
        config = self.config
        return links.ReceiverLinks(sock, config.endpoints, self.team.health,
                                   drop=len(config.endpoints) > 1)

    def new_sender(self, sock):
        """The send path: plain, or holding each frame until confirmed (--confirm)."""
        if self.confirmations is None:
            return push.PushSender(sock, self.name, self.team, self.tally, self.links)
        window = self.confirmations.window(self.number)
        return windows.ConfirmingSender(sock, self.name, self.team, self.tally, self.links,
                                        self.confirmations, window, self.config.confirm_timeout)

    def send_tasks(self, sender, encoder):
        """The seed's loop: each task through send_task(); a quiet flood's through
        sender.send_many() while no task needs a wait or a decision."""
        config = self.config
        paced = self.schedule is not None
        # Without a pause of 10 ms or more, [MSG] lines are logged in blocks of LOG_BLOCK.
        slow = paced and self.schedule.interval >= 0.01
        lines = None if config.quiet else logs.BlockLog(self.log, 1 if slow else LOG_BLOCK)
        timed = paced or config.warmup > 0
        if not paced:  # a flood with --start-at waits for it; a schedule waits in due_frame
            instances.wait_for_start(self.clock, sender.pause)
        many, task = not timed and lines is None and self.confirmations is None, 0
        while task < config.messages:
            if many:
                task = sender.send_many(encoder.data, range(task, config.messages),
                                        config.max_size)
            if task == config.messages or not self.send_task(sender, encoder, task, lines,
                                                             timed):
                break
            task += 1
        self.sent_until = time.monotonic()
        if lines is not None:
            lines.flush()

    def send_task(self, sender, encoder, task, lines, timed):
        """Wait for its time, build its frame, send, log; False: the worker stops."""
        config, tally = self.config, self.tally
        frame = self.due_frame(sender, encoder, task) if timed else encoder.data(task)
        if self.team.stop.is_set():
            tally.not_sending(range(task, config.messages), Outcome.INTERRUPTED)
            return False
        if len(frame) > config.max_size:
            tally.not_sending(range(task, task + 1), Outcome.TOO_LARGE)
            self.log.warning(f"[FAIL] {self.name} task {task}: {len(frame)} bytes is over"
                             f" the {config.max_size}-byte limit; not sent")
            return True
        failure = sender.send(frame, task)
        if failure:
            tally.not_sending(range(task, config.messages), failure)
            return False
        tally.sent += 1
        if timed and self.due_lag is not None:  # a lag counts once its message is sent
            self.lag.add(self.due_lag)
        if lines is not None:
            lines.add(logs.msg_line(next(self.counter), self.name, config.target, task,
                                    encoder.text(task)))
        return True

    def due_frame(self, sender, encoder, task):
        """Wait (off turn) until the task's intended time, then its frame; its lag (ns) in
        due_lag (None: none to record), recorded once it is sent. The loop's stop check
        comes after the wait."""
        self.due_lag = None
        if self.schedule is None:  # a flood with --warmup: intended = actual
            return encoder.data_at(task, time.time_ns(), time.monotonic() < self.warmup_until)
        intended_ns, warmup, late = self.schedule.wait_until_due(task, sender.pause)
        if not warmup:
            self.due_lag = int(late * 1e9)
        return encoder.data_at(task, intended_ns, warmup)


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
        curve = bool(self.config.curve_keys)  # then a failed handshake means a wrong key
        while not self.stop.is_set():
            for monitor, _ in poller.poll(POLL_INTERVAL):
                endpoint = monitors[monitor]
                change = link_change(monitor_event(monitor),
                                     self.health.states[endpoint], curve)
                if change:
                    self.transition(endpoint, *change)
            if time.monotonic() >= first_verdict:
                for endpoint, state in self.health.states.items():
                    if state is LinkState.UNKNOWN:
                        self.transition(endpoint, LinkState.DOWN, "not reachable")

    def transition(self, endpoint, state, reason):
        """Record a new link state, and log it if it changed."""
        if self.health.set_state(endpoint, state):
            log = {LinkState.UP: self.log.info, LinkState.REJECTED: self.log.error}.get(
                state, self.log.warning)
            log(f"[HEARTBEAT] receiver {endpoint} {state.value}: {reason}")


# ---------------------------------------------------------------------------
# The run and its stop sequence
# ---------------------------------------------------------------------------
def send_run(config, signals, log, judge=None, exporter=None):
    """Start the helpers and the workers, wait for them, stop them, flush, report (or, for
    a --find-max step, return what `judge` makes of the run); then hold the final figures
    for a last scrape (`exporter`, --metrics-port)."""
    exporter = exporter or metrics.NoExporter()
    plan = config.plan
    run_id = random.getrandbits(63) if plan.wire_id is None else plan.wire_id
    run = wire.RunInfo(run_id, plan.run_workers(config.workers), config.messages,
                       len(config.endpoints), config.confirm, config.scheduled)
    try:
        series = cli.CsvSeries(config.csv_path, sender_summary.SENDER_CSV_COLUMNS)
    except OSError as exc:
        log.error(f"[EXIT] cannot write --csv {config.csv_path}: {exc.strerror}")
        return SenderExit.NOT_ALL_SENT  # cannot start, as for a log file
    workers = []
    try:  # --hlog: the send lag per stats interval (`workers`: the list as started below)
        lags = hlog.open_log(config.hlog, "pushpull sender: send lag",
                             lambda: {wire.run_label(run.run_id): [w.lag for w in workers]},
                             config.stats_interval, time.monotonic(), log)
    except OSError as exc:
        series.close()
        log.error(f"[EXIT] cannot write --hlog {config.hlog}: {exc.strerror}")
        return SenderExit.NOT_ALL_SENT
    health = ReceiverHealth(config.endpoints)
    stop = threading.Event()
    confirmations = (windows.Confirmations(config.workers, config.window,
                                           plan.first_worker(config.workers))
                     if config.confirm else None)
    channel = listener.ConfirmChannel(run.run_id, config.endpoints, config.confirm_port,
                                     confirmations, config.timeout, config.retries)
    team = push.Team(sendflow.SendTurns(), health, stop, log, config.timeout, config.retries,
                     sendflow.FlushDeadline(config.timeout), push.WorkerNotices(log),
                     channel.all_reported)
    started = time.monotonic()
    ctx = zmq.Context()
    # libzmq's default of 1023 sockets is too few for MAX_WORKERS. Each receiver's
    # heartbeat probe and channel SUB need as many as a worker: a socket, a monitor pair.
    ctx.set(zmq.MAX_SOCKETS, SOCKETS_PER_WORKER * (config.workers + 2 * len(config.endpoints)))
    try:
        helpers = start_helpers(ctx, config, health, channel, stop, log)
        workers[:] = start_workers(ctx, config, run, team, confirmations, channel)
        started = max(started, workers[0].clock.monotonic)  # not the wait for --start-at
        exporter.watch(metrics.SenderSource(config, wire.run_label(run.run_id), workers, health,
                                            confirmations, started, connection_holds(config)),
                       log)
        with series:
            wait_for_workers(config, workers, health, signals, stop, log, series, lags)
        duration = time.monotonic() - started  # the run's; the wait for reports is not in it
        lags.close(time.monotonic())  # its last interval: every worker is done sending
        # The receivers' reports of the run; no wait after Ctrl+C, or with no receiver up.
        within = 0 if signals.first.is_set() or not health.is_up() else config.report_timeout
        # A shared run's reports are awaited until they count the whole run (the other
        # instances may finish later); a run of one's, until they count what it sent.
        expected = config.run_planned if config.plan.shared else sum(w.tally.sent
                                                                     for w in workers)
        channel.wait_for_reports(within, signals.first, expected)
        if not config.confirm:  # under --confirm, what is unconfirmed is known exactly
            links.await_late_verdicts(channel, health, config.heartbeat_interval,
                                      started + duration, signals.first, log)
        team.flush.start()  # the run has ended: every worker closes its socket now
        join_stopped(workers, log)
        team.notices.log_counts()  # how many workers met each cause logged only once
        stop.set()
        join_stopped(helpers, log)
    finally:
        stop.set()  # after an unexpected error: threads let go of their sockets
        team.flush.start()
        flush_result = flush(ctx, config, team.flush, workers)
    if judge is not None:
        return judge(run, workers, channel, signals.first.is_set())
    sent = sum(w.tally.sent for w in workers)
    status = report(config, run, workers, health, confirmations, flush_result,
                    sender_summary.receiver_verdict(config, channel, sent), duration,
                    signals.first.is_set(), log, exporter)
    exporter.hold(config.metrics_hold, signals)
    return status


def start_helpers(ctx, config, health, channel, stop, log):
    """Start the heartbeat monitor and the confirmation listener; wait (at most one
    heartbeat interval) until each receiver's channel connected, or was refused."""
    helpers = [HeartbeatMonitor(ctx, config, health, stop, log),
               listener.ConfirmListener(ctx, channel, health, config, stop, log)]
    for thread in helpers:
        thread.start()
    channel.wait_settled(config.heartbeat_interval, stop)
    return helpers


def start_workers(ctx, config, run, team, confirmations, channel):
    """Log the [START] line, and start the workers on one schedule clock."""
    counter = itertools.count(1)
    clock = instances.start_clock(config.plan)
    first = config.plan.first_worker(config.workers)  # workers are numbered run-wide
    workers = [PushWorker(n, ctx, config, run, team, counter, clock, confirmations)
               for n in range(first + 1, first + config.workers + 1)]
    team.health.sent_counts = lambda: [worker.tally.sent for worker in workers]  # its lapses
    shown_format = f", {config.format} format" if config.format != "binary" else ""
    place = instances.describe(config.plan, config.workers).lstrip(", ")
    team.log.info(logs.continued(
        f"[START] run {wire.run_label(run.run_id)}: {config.workers} workers x"
        f" {config.messages} messages{shown_format}"
        f"{schedule.describe(config.rate, config.delay, config.warmup)}",
        [*([place] if place else []), f"-> {', '.join(config.endpoints)}",
         f"confirmations and reports from {channel.describe()}"]))
    for worker in workers:
        worker.start()
    return workers


def wait_for_workers(config, workers, health, signals, stop, log, series, lags):
    """Wait until every worker is done sending, printing [STATS] (and --csv rows, --hlog
    intervals: `lags`); the first Ctrl+C stops them."""
    stats = sender_summary.SenderStats(config, workers, health, series, log)
    for worker in workers:
        while worker.is_alive() and not worker.done_sending.is_set():
            worker.done_sending.wait(POLL_INTERVAL / 1000)
            if signals.first.is_set() and not stop.is_set():
                stop.set()
                log.warning("[STOP] interrupted: stopping workers, flushing what was sent"
                            " (Ctrl+C again to exit at once)")
            stats.tick(time.monotonic())
            lags.tick(time.monotonic())
    stats.last_row()


def flush(ctx, config, deadline, workers):
    """Terminate the context: blocks until every socket's queued messages have left, or
    the flush deadline (SERVER_TIMEOUT from the end of the run) cut them off. A flush cut
    short may have lost, per worker, what its connections can hold
    (sendflow.in_flight_bound), and never more than it sent."""
    ctx.term()
    ended = time.monotonic()
    complete = deadline.met(ended)
    per_worker = len(config.endpoints) * connection_holds(config)
    bound = 0 if complete else sum(min(worker.tally.sent, per_worker) for worker in workers)
    return sendflow.FlushResult(complete, bound, ended - deadline.started_at)


def connection_holds(config):
    """Messages one worker's connection to one receiver can hold
    (sendflow.in_flight_bound), counted in the smallest frames the run sends."""
    return sendflow.in_flight_bound(max(config.size, wire.HEADER_SIZE), config.hwm,
                                    RECEIVER_HWM, SOCKET_BUFFER, SOCKET_BUFFER)


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
def report(config, run, workers, health, confirmations, flush_result, receiver_report,
           duration, interrupted, log, exporter):
    """Log the summary table and the gates (and write the JSON); returns the exit status.
    The exporter (--metrics-port) shows the summary's figures from then on."""
    data = sender_summary.sender_data(config, run, workers, health, confirmations,
                                      flush_result, receiver_report, duration,
                                      connection_holds(config))
    exporter.final(data)
    text = sender_summary.sender_table(data)
    lag = sender_summary.merged_lag(workers)
    if config.scheduled and not config.quiet and lag.count:  # no histogram of nothing sent
        text += "\n" + "\n".join(lag.text_lines("Send lag"))
    log.info("\n" + text)
    for record in data["gates"]:
        (log.info if record["passed"] else log.error)(
            verdict.gate_line(record, sender_summary.GATE_UNITS[record["name"]]))
    saved = not config.json_path or cli.save_summary(config.json_path, data, log)
    status, reason = sender_summary.exit_reason(config, data, health, interrupted)
    if status == SenderExit.OK and config.plan.shared:  # a loss anywhere fails every instance
        status, reason = sender_summary.shared_run_exit(data)
    failed_gates = [g["name"] for g in data["gates"] if not g["passed"]]
    if status == SenderExit.OK and not saved:
        status, reason = SenderExit.NOT_ALL_SENT, "the --json summary could not be written"
    elif status == SenderExit.OK and failed_gates:
        status, reason = SenderExit.NOT_ALL_SENT, f"gate failed: {', '.join(failed_gates)}"
    if reason:
        log.error(f"[EXIT] {reason}")
    return status


# ---------------------------------------------------------------------------
# Configuration: the flags, read into a Config
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
    confirm_timeout: float
    confirm_port: "int | None"
    report_timeout: float
    max_loss: "float | None"
    max_p99: "float | None"
    curve_keys: "tuple | None"  # (public, secret, server public), loaded by with_client_keys
    curve_client_key: "str | None"
    curve_server_public: "str | None"
    generate_keys: "str | None"
    rate: "float | None"
    duration: "float | None"
    warmup: float
    format: str
    csv_path: "str | None"
    metrics_port: "int | None"
    metrics_bind: str
    metrics_hold: float
    hlog: "str | None"
    plan: instances.Plan = instances.Plan()  # this process's place in a shared run
    find_max: bool = False
    step_duration: float = STEP_DURATION
    precision: float = FIND_MAX_PRECISION

    @property
    def planned(self):
        """Messages this run plans to send (this instance's share of a shared run)."""
        return self.workers * self.messages

    @property
    def run_planned(self):
        """Messages the whole run plans to send, over every instance."""
        return self.plan.run_workers(self.workers) * self.messages

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
        formatter_class=cli.HelpFormatter)
    load = p.add_argument_group("load")
    load.add_argument("--workers", type=cli.count(1, cli.MAX_WORKERS), default=NUM_WORKERS,
                      help=f"worker threads, at most {cli.MAX_WORKERS} (NUM_WORKERS)")
    add_load_flags(load)
    load.add_argument("--size", metavar="BYTES", type=cli.count(0, cli.MAX_FRAME_SIZE),
                      default=MESSAGE_SIZE, help="pad each message to at least BYTES (MESSAGE_SIZE)")
    load.add_argument("--max-size", metavar="BYTES", type=cli.count(1, cli.MAX_FRAME_SIZE),
                      default=MAX_MESSAGE_SIZE, help="largest message sent (MAX_MESSAGE_SIZE)")
    load.add_argument("--hwm", metavar="N", type=cli.count(1, cli.MAX_HWM), default=SEND_HWM,
                      help="ZeroMQ send high-water mark per worker (SEND_HWM)")
    findmax.add_flags(load, FIND_MAX, STEP_DURATION, FIND_MAX_PRECISION, FIND_MAX_START_RATE)
    instances.add_flags(load, NUM_INSTANCES, INSTANCE_INDEX, RUN_NAME, START_AT, NUM_PROCESSES)
    add_receiver_flags(p.add_argument_group("receivers"))
    add_delivery_flags(p.add_argument_group("delivery"))
    security_flags = p.add_argument_group("security")
    security_flags.add_argument("--curve-client-key", metavar="FILE", default=CURVE_CLIENT_KEY,
                                help="this sender's secret certificate: turns CURVE on"
                                     " (CURVE_CLIENT_KEY)")
    security_flags.add_argument("--curve-server-public", metavar="FILE",
                                default=CURVE_SERVER_PUBLIC,
                                help="the receiver's public certificate (CURVE_SERVER_PUBLIC)")
    cli.add_key_flag(security_flags)
    output = p.add_argument_group("output")
    output.add_argument("--log-file", metavar="PATH",
                        default=LOG_FILE if ENABLE_FILE_LOGGING else None,
                        help="also log to PATH (ENABLE_FILE_LOGGING, LOG_FILE)")
    cli.add_report_flags(output, QUIET, STATS_INTERVAL, JSON_SUMMARY, CSV_FILE)
    cli.add_live_flags(output, METRICS_PORT, METRICS_BIND, METRICS_HOLD, HLOG_FILE)
    return p


def add_receiver_flags(p):
    """Where the receivers are, and how long to wait for one that is down."""
    # SUPPRESS: "append" would add to a default list instead of replacing it.
    p.add_argument("--connect", metavar="ENDPOINT", type=cli.endpoint, action="append",
                   default=argparse.SUPPRESS,
                   help=f"receiver endpoint, repeatable (SERVER_ENDPOINTS) (default:"
                        f" {' '.join(SERVER_ENDPOINTS)})")
    p.add_argument("--timeout", metavar="SECONDS", default=SERVER_TIMEOUT,
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                   help="wait for an absent receiver before a retry; flush bound (SERVER_TIMEOUT)")
    p.add_argument("--retries", type=cli.count(0, cli.MAX_RETRIES),
                   default=CONNECTION_RETRY_ATTEMPTS,
                   help="retries before a worker gives up (CONNECTION_RETRY_ATTEMPTS)")
    p.add_argument("--heartbeat-interval", metavar="SECONDS",
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_HEARTBEAT_INTERVAL),
                   default=HEARTBEAT_INTERVAL, help="receiver health checks (HEARTBEAT_INTERVAL)")


def add_delivery_flags(p):
    """What the receivers confirm and report of the run, and the gates judged on it."""
    p.add_argument("--confirm", action="store_true", default=CONFIRM_DELIVERY,
                   help="resend until every task is confirmed processed (CONFIRM_DELIVERY)")
    p.add_argument("--window", metavar="N", type=cli.count(1, wire.COUNT_MAX),
                   default=CONFIRM_WINDOW,
                   help="unconfirmed messages per worker before it waits (CONFIRM_WINDOW)")
    p.add_argument("--confirm-timeout", metavar="SECONDS", default=CONFIRM_TIMEOUT,
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                   help="wait for confirmations after a worker's last send, then give up"
                        " (CONFIRM_TIMEOUT)")
    p.add_argument("--confirm-port", metavar="PORT", type=cli.port, default=CONFIRM_PORT,
                   help="port of the receivers' confirmation channel; default: each receiver's"
                        " port + 1 (CONFIRM_PORT)")
    p.add_argument("--report-timeout", metavar="SECONDS", default=REPORT_TIMEOUT,
                   type=cli.seconds(0, cli.MAX_REPORT_TIMEOUT),
                   help="wait after the run for the receivers' reports (REPORT_TIMEOUT)")
    p.add_argument("--max-loss", metavar="PERCENT", type=cli.number(0, 100, "percent"),
                   default=MAX_LOSS,
                   help="gate: exit 1 unless the receivers got all but PERCENT of the planned"
                        " messages (MAX_LOSS)")
    p.add_argument("--max-p99", metavar="MS",
                   type=cli.number(0, cli.MAX_REPORT_TIMEOUT * 1000, "ms"), default=MAX_P99,
                   help="gate: exit 1 unless the receivers' p99 latency is at most MS (MAX_P99)")


def add_load_flags(p):
    """How much to send and when: count or duration, delay or rate, warmup, format."""
    count = p.add_mutually_exclusive_group()
    count.add_argument("--messages", type=cli.count(0, wire.COUNT_MAX),
                       default=MESSAGES_PER_WORKER,
                       help="messages per worker (MESSAGES_PER_WORKER)")
    count.add_argument("--duration", metavar="SECONDS", default=RUN_DURATION,
                       type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                       help="send what the schedule holds in SECONDS instead (RUN_DURATION)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--delay", metavar="SECONDS", default=MESSAGE_DELAY,
                      type=cli.seconds(0, cli.MAX_SECONDS),
                      help="each worker sends at start + k x SECONDS (MESSAGE_DELAY)")
    pace.add_argument("--rate", metavar="MSG_PER_S", default=TARGET_RATE,
                      type=cli.number(cli.MIN_RATE, cli.MAX_RATE, "messages per second"),
                      help="messages per second across all workers, open loop (TARGET_RATE)")
    p.add_argument("--warmup", metavar="SECONDS", default=WARMUP,
                   type=cli.seconds(0, cli.MAX_SECONDS),
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
    findmax.check_flags(p, a, FIND_MAX_START_RATE)
    if a.size > a.max_size:
        p.error(f"--size {a.size} is over --max-size {a.max_size}: every message would be"
                " refused as too large")
    delay = 0.0 if a.rate else a.delay
    plan = instances.plan_from_args(p, a)
    run_workers = plan.run_workers(a.workers)  # --rate and --duration are the whole run's
    messages = a.messages
    if a.duration is not None:
        messages = schedule.messages_for_duration(a.duration, run_workers, a.rate, delay)
        if messages < 1:
            p.error("--duration needs a schedule (--rate, or --delay > 0) that holds at least"
                    " one message per worker")
    if run_workers * messages > cli.MAX_RUN_MESSAGES:
        counted = f"--messages {messages}" if a.duration is None else \
            f"the {messages} messages per worker of --duration"
        workers = f"--workers {a.workers}" if run_workers == a.workers else \
            f"{run_workers} workers in all"
        p.error(f"{workers} x {counted} is more than the"
                f" {cli.MAX_RUN_MESSAGES} messages a run can count")
    cli.check_output_path(p, "--json", a.json)
    cli.check_output_path(p, "--csv", a.csv)
    cli.check_live_flags(p, a)
    if a.confirm:
        try:
            for ep in getattr(a, "connect", SERVER_ENDPOINTS):
                channel.confirm_endpoint(ep, a.confirm_port)
        except ValueError as exc:
            p.error(str(exc))
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(Config) if hasattr(a, f.name)}
    return Config(**{**flags, "messages": messages, "delay": delay, "json_path": a.json,
                     "csv_path": a.csv, "curve_keys": None, "plan": plan,
                     "endpoints": tuple(getattr(a, "connect", SERVER_ENDPOINTS))})


def main(argv=None):
    """Run the workers to the end of the run; returns the exit status."""
    config = parse_args(argv)
    if config.plan.processes > 1:  # this process starts the instances and waits for them
        return cli.run_script("async-socket-sender", config, functools.partial(
            processes.run_instances, __file__, sys.argv[1:] if argv is None else argv),
            SenderExit.NOT_ALL_SENT)
    # File descriptors the run needs: each socket's mailbox, one per connection, spare.
    sockets = config.workers + 2 * len(config.endpoints) + 2  # workers, probes, SUBs, logs
    needed = sockets * (1 + len(config.endpoints)) + OPEN_FILES_SPARE
    allowed = cli.ensure_open_files(needed)
    if allowed is not None and allowed < needed:
        print(f"async-socket-sender: error: --workers {config.workers} with"
              f" {len(config.endpoints)} receiver(s) needs about {needed} open files; this"
              f" process may open {allowed} (raise it with ulimit -n, or use fewer workers)",
              file=sys.stderr)
        return SenderExit.BAD_COMMAND_LINE
    with metrics.start("async-socket-sender", "sender", config.metrics_port,
                       config.metrics_bind) as exporter:  # exit 2 if its port is taken
        run = functools.partial(send_run, exporter=exporter)
        body = functools.partial(findmax.search, run) if config.find_max else run
        return cli.run_script("async-socket-sender", config,
                              functools.partial(with_client_keys, body),
                              SenderExit.NOT_ALL_SENT, exit_on_second=True)


def with_client_keys(body, config, signals, log):
    """Load the CURVE keys into the Config, then run `body`; exit 1 if a key cannot be read.

    Called by cli.run_script after it handled --generate-keys: a bad key path must not
    block key generation."""
    try:
        keys = security.load_client_keys(config.curve_client_key, config.curve_server_public)
    except security.KeyFileError as exc:
        print(f"async-socket-sender: {exc}", file=sys.stderr)
        return SenderExit.NOT_ALL_SENT
    return body(dataclasses.replace(config, curve_keys=keys), signals, log)


if __name__ == "__main__":
    sys.exit(main())
