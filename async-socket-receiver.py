#!/usr/bin/env python3
"""ZeroMQ PULL server: one receive thread feeds a queue, one processor thread works it.

Run it first, then async-socket-sender.py in a second terminal. Every constant
below can also be set by a command-line flag (--help lists them). Read from the top:
constants, configuration, the sockets, the receive thread, the processor thread, the
run (serve: start, stop sequence), the summary. Machinery lives in pushpull/.
"""

import argparse
import enum
import os
import queue
import sys
import time
from dataclasses import dataclass

import zmq

from pushpull import cli, confirm, flow, links, logs, runs, security, spill, threads, wire
from pushpull.threads import POLL_INTERVAL, POLL_S
from pushpull.wire import CLIENT, DATA, END, KIND, RUN, TASK, TEXT, WORKER

# ---------------------------------------------------------------------------
# Constants: edit these to tune a run, or pass the matching flag
# ---------------------------------------------------------------------------
TCP_PORT = 5560  # TCP port the PULL socket binds
BIND_ADDRESS = "*"  # interface to bind: "*" is every interface
ENABLE_FILE_LOGGING = True  # also write the log to LOG_FILE
LOG_FILE = "server_logs.txt"  # path of the log file
PROCESSING_TIME = 0.1  # seconds of simulated work per message
QUEUE_MAXSIZE = 10000  # messages waiting between the receive and processor threads
QUEUE_MAXBYTES = 33554432  # bytes of messages waiting there (32 MiB): whichever bound comes first
RECEIVE_HWM = 200  # messages ZeroMQ may buffer per sender connection (ZMQ_RCVHWM)
MAX_MESSAGE_SIZE = 1048576  # bytes; ZeroMQ drops a peer that sends more (ZMQ_MAXMSGSIZE)
QUIET = False  # True: no per-message lines, only [STATS], [RUN] and the summary
STATS_INTERVAL = 5.0  # seconds between [STATS] lines while there is work
JSON_SUMMARY = None  # path to write the final summary as JSON, or None
SPILL_FILE = "receiver_spill_{port}.bin"  # where unprocessed messages are saved; {port}: --port
RUN_IDLE_TIMEOUT = 15.0  # seconds of silence before an unfinished sender run is reported
CONFIRM_PORT = None  # TCP port of the confirmation PUB socket; None: TCP_PORT + 1
CURVE_SERVER_KEY = None  # path of the receiver's secret certificate; None: no encryption
CURVE_ALLOW_DIR = None  # directory of allowed clients' public certificates; None: any key
ALLOWED_IPS = []  # client addresses allowed in (ZAP); empty: every address
CSV_FILE = None  # path of a CSV file with one row per stats interval, or None

BATCH_MAX = 1000  # messages moved through the queue in one batch
STOP_DRAIN_QUIET = 50  # milliseconds without a message that end the warm-stop drain
STOP_DRAIN_LIMIT = 5.0  # seconds the warm-stop drain may take while senders keep sending
STILL_SENDING_WINDOW = 1.0  # seconds: senders heard in this last stretch count as sending
STILL_SENDING_COUNTED = 1000  # senders the drain tells apart at most, for its log line
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to complete its ZeroMQ handshake
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt
CONFIRM_INTERVAL = 0.05  # seconds between confirmation messages to --confirm senders
WARNING_INTERVAL = 1.0  # seconds between two warnings of the same kind
SILENCE_CHECK_INTERVAL = 1.0  # seconds between checks for silent senders while busy

CSV_COLUMNS = ("time_s", "received", "processed", "rate_msg_s", "queue", "latency_p50_ms",
               "latency_p99_ms", "latency_max_ms", "invalid")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_FAILED = 1


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Settings for one receiver process."""

    port: int
    confirm_port: int
    bind: str
    processing_time: float
    queue_size: int
    queue_bytes: int
    hwm: int
    max_size: int
    log_file: "str | None"
    quiet: bool
    stats_interval: float
    json_path: "str | None"
    spill_file: str
    run_timeout: float
    curve_server_key: "str | None"
    curve_allow: "str | None"
    allow_ips: tuple
    generate_keys: "str | None"
    csv_path: "str | None"

    @property
    def endpoint(self):
        """The address the PULL socket binds."""
        return cli.tcp_endpoint(self.bind, self.port)

    @property
    def confirm_endpoint(self):
        """The address of the PUB socket that confirms processed tasks to senders."""
        return cli.tcp_endpoint(self.bind, self.confirm_port)


def build_parser():
    """The command line: one flag per tuning constant, defaults from the constants."""
    p = argparse.ArgumentParser(
        description="ZeroMQ PULL receiver: receive thread -> queue -> processor thread.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--port", type=cli.port, default=TCP_PORT,
                   help="TCP port to bind (TCP_PORT)")
    p.add_argument("--confirm-port", metavar="PORT", type=cli.port,
                   default=CONFIRM_PORT,
                   help="port of the confirmation socket; default: --port + 1 (CONFIRM_PORT)")
    p.add_argument("--bind", metavar="ADDRESS", type=cli.bind_address, default=BIND_ADDRESS,
                   help="interface to bind, * for all, :: for all IPv6 too (BIND_ADDRESS)")
    p.add_argument("--processing-time", metavar="SECONDS", type=cli.seconds(0, cli.MAX_SECONDS),
                   default=PROCESSING_TIME, help="simulated work per message (PROCESSING_TIME)")
    p.add_argument("--queue-size", metavar="N", type=cli.count(1, cli.MAX_QUEUE_SIZE),
                   default=QUEUE_MAXSIZE, help="messages the queue holds (QUEUE_MAXSIZE)")
    p.add_argument("--queue-bytes", metavar="BYTES", type=cli.count(1, cli.MAX_QUEUE_BYTES),
                   default=QUEUE_MAXBYTES,
                   help="bytes of messages the queue holds (QUEUE_MAXBYTES)")
    p.add_argument("--hwm", metavar="N", type=cli.count(1, cli.MAX_HWM), default=RECEIVE_HWM,
                   help="ZeroMQ receive high-water mark (RECEIVE_HWM)")
    p.add_argument("--max-size", metavar="BYTES", type=cli.count(1, cli.MAX_FRAME_SIZE),
                   default=MAX_MESSAGE_SIZE, help="largest message accepted (MAX_MESSAGE_SIZE)")
    p.add_argument("--log-file", metavar="PATH", default=LOG_FILE,
                   help="log file (LOG_FILE)")
    p.add_argument("--no-file-log", action="store_true", default=not ENABLE_FILE_LOGGING,
                   help="log to the console only (ENABLE_FILE_LOGGING = False)")
    cli.add_report_flags(p, QUIET, STATS_INTERVAL, JSON_SUMMARY, CSV_FILE)
    p.add_argument("--spill-file", metavar="PATH", default=SPILL_FILE,
                   help="where unprocessed messages are saved at a stop, for the next start;"
                        " {port} becomes the --port (SPILL_FILE)")
    p.add_argument("--run-timeout", metavar="SECONDS",
                   type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                   default=RUN_IDLE_TIMEOUT,
                   help="silence before an unfinished run is reported (RUN_IDLE_TIMEOUT)")
    p.add_argument("--curve-server-key", metavar="FILE", default=CURVE_SERVER_KEY,
                   help="receiver's secret certificate: turns CURVE on (CURVE_SERVER_KEY)")
    p.add_argument("--curve-allow", metavar="DIR", default=CURVE_ALLOW_DIR,
                   help="public certificates of allowed clients (CURVE_ALLOW_DIR)")
    p.add_argument("--allow-ip", metavar="ADDRESS", type=cli.ip_address, action="append",
                   default=argparse.SUPPRESS,
                   help=f"client address allowed in, repeatable (ALLOWED_IPS) (default:"
                        f" {' '.join(ALLOWED_IPS) or 'any address'})")
    return p


def parse_args(argv=None):
    """Read the command line into a Config."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.curve_allow and not a.curve_server_key:
        p.error("--curve-allow needs --curve-server-key")
    try:
        confirm_port = confirm.confirm_port(a.port, a.confirm_port)
    except ValueError as exc:
        p.error(str(exc))
    spill_file = a.spill_file.replace("{port}", str(a.port))
    cli.check_output_path(p, "--spill-file", spill_file)
    cli.check_output_path(p, "--json", a.json)
    cli.check_output_path(p, "--csv", a.csv)
    return Config(port=a.port, confirm_port=confirm_port,
                  bind=a.bind, processing_time=a.processing_time, queue_size=a.queue_size,
                  queue_bytes=a.queue_bytes,
                  hwm=a.hwm, max_size=a.max_size,
                  log_file=None if a.no_file_log else a.log_file, quiet=a.quiet,
                  stats_interval=a.stats_interval, json_path=a.json,
                  spill_file=spill_file, run_timeout=a.run_timeout,
                  curve_server_key=a.curve_server_key, curve_allow=a.curve_allow,
                  allow_ips=tuple(getattr(a, "allow_ip", ALLOWED_IPS)),
                  generate_keys=a.generate_keys, csv_path=a.csv)


# ---------------------------------------------------------------------------
# The sockets: PULL for the messages, PUB for the confirmations
# ---------------------------------------------------------------------------
def open_pull_socket(ctx, config, server_keys):
    """The PULL socket the senders connect to, bound; StartupError if it cannot bind."""
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    # No ZMTP heartbeats on this data socket: libzmq 4.3.5 aborts
    # (stream_engine_base.cpp:310, !_io_error) when a heartbeat fires on a
    # connection whose input is stopped at the high-water mark. The senders
    # watch the receiver's health instead, from a socket that carries no data.
    sock.rcvhwm = config.hwm
    # Loopback may otherwise buffer tens of MB per connection in the kernel,
    # hiding a slow receiver from its senders.
    sock.rcvbuf = SOCKET_BUFFER
    sock.maxmsgsize = config.max_size
    bind(sock, config.endpoint, server_keys, f"port {config.port}", config.bind)
    return sock


def open_confirm_socket(ctx, config, server_keys):
    """The PUB socket that tells --confirm senders what was processed, bound."""
    sock = ctx.socket(zmq.PUB)
    # A moment for the last confirmations to leave; senders resend what they miss.
    sock.linger = int(CONFIRM_INTERVAL * 1000) * 4
    bind(sock, config.confirm_endpoint, server_keys,
         f"confirmation port {config.confirm_port}", config.bind)
    return sock


def bind(sock, endpoint, server_keys, what, address):
    """Secure and bind a server socket; if it cannot bind, close it and raise StartupError."""
    security.apply_server_security(sock, server_keys)
    sock.handshake_ivl = int(HANDSHAKE_TIMEOUT * 1000)
    links.keep_alive(sock)  # a crashed sender's half-open connections are cleaned up
    sock.ipv6 = cli.wants_ipv6([endpoint])
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise threads.StartupError(cli.bind_error(endpoint, what, address, exc)) from None


# ---------------------------------------------------------------------------
# Counters shared by the threads: each field has exactly one writer
# ---------------------------------------------------------------------------
class Counters:
    """Totals for [STATS] and the summary."""

    def __init__(self):
        self.received = 0  # receive thread: taken off the socket
        self.recovered = 0  # main, before the threads start: read back from a spill file
        self.invalid = 0  # receive thread and its PeerWatch (main: a spill file's)
        self.rejected = 0  # PeerWatch: peers refused by CURVE or the IP allow list
        self.rejected_connections = 0  # PeerWatch: handshakes of non-ZeroMQ peers
        self.peers = 0  # PeerWatch: connected peers (sender sockets and health probes)
        self.processed = 0  # processor thread (its RunLedger)
        self.duplicates = 0  # processor thread: tasks processed before, dropped
        self.plain = 0  # processor thread: messages in no sender run
        self.clock_skew = 0  # processor thread: send times kept out of the latencies
        self.spilled = 0  # main

    @property
    def backlog(self):
        """Messages received but not yet processed: queued, or in the processor's hands."""
        return self.received + self.recovered - self.processed - self.duplicates


# ---------------------------------------------------------------------------
# The receive thread: socket -> queue
# ---------------------------------------------------------------------------
class ReceiveThread(threads.ServiceThread):
    """Owns the PULL socket: binds it, takes its messages off in batches, queues them."""

    def __init__(self, ctx, config, server_keys, batches, counters, stops, log, run_cache,
                 overflow):
        super().__init__("receiver", log)
        self.ctx = ctx
        self.config = config
        self.server_keys = server_keys
        self.batches = batches
        self.counters = counters
        self.stops = stops
        self.overflow = overflow  # a spill.SpillWriter: the warm-stop drain's beyond the bound
        self.warnings = logs.RateLimitedLog(log, WARNING_INTERVAL)
        self.peers = security.PeerWatch(counters, self.warnings, curve=bool(server_keys),
                                        settle=HANDSHAKE_TIMEOUT)
        self.run_cache = run_cache  # wire.decode()'s: a run's header bytes -> its RunInfo
        self.target = f"Server:{config.bind}:{config.port}"

    def serve(self):
        """Bind the PULL socket, then receive until a stop."""
        try:
            with open_pull_socket(self.ctx, self.config, self.server_keys) as sock:
                monitor = sock.get_monitor_socket(security.PEER_EVENTS)
                try:
                    self.started()
                    self.receive_until_stop(sock, monitor)
                finally:
                    sock.disable_monitor()
                    monitor.close(linger=0)
        finally:
            self.stops.receive_done.set()

    def receive_until_stop(self, sock, monitor):
        """Move messages from the socket to the queue; on a warm stop, drain, then return."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while not self.stops.cold.is_set():
            if self.stops.warm.is_set():
                self.drain_for_stop(sock, monitor)
                return
            ready = dict(poller.poll(POLL_INTERVAL))
            if monitor in ready:
                self.peers.read(monitor)
            elif self.peers.guesses:
                self.peers.report_guesses()
            if sock in ready:
                # Take no more than the queue has room for: its bound is exact, and
                # what stays in the socket pushes back on the senders.
                room, byte_room = self.batches.wait_for_room(POLL_S)
                batch = self.receive(sock, min(BATCH_MAX, room), byte_room) if room else None
                if batch is not None:
                    self.hand_over(batch)

    def receive(self, sock, limit, max_bytes):
        """Take up to `limit` waiting messages, about `max_bytes` (one message past it at
        most), off the socket as one Batch; None if none."""
        messages, ends, size = wire.receive_messages(sock, limit, max_bytes, self.run_cache,
                                                     self.invalid)
        if not messages:
            return None
        # Stamped once the batch is off the socket: latencies never count a frame as
        # received before it was.
        batch = flow.Batch(time.time_ns(), messages, nbytes=size)
        first = self.counters.received + 1
        self.counters.received += len(messages) - ends  # END frames are bookkeeping
        if not self.config.quiet:
            self.log_received(messages, first)
        return batch

    def log_received(self, messages, number):
        """The [MSG] lines of a batch, numbered from `number`, logged as one record."""
        lines = logs.LineBlock()
        for msg in messages:
            if msg[KIND] != END:
                lines.append(logs.msg_line(number, wire.client_name(msg), self.target,
                                           msg[TASK], msg[TEXT]))
                number += 1
        if lines:
            self.log.info(lines)

    def hand_over(self, batch):
        """Queue a batch, waiting for room; once a stop has come, past the bound."""
        while not (self.stops.warm.is_set() or self.stops.cold.is_set()):
            try:
                self.batches.put(batch, timeout=POLL_S)
                return
            except queue.Full:
                continue
        self.batches.put_past_bound(batch)

    def drain_for_stop(self, sock, monitor):
        """Warm stop: take everything already on its way, until the socket has been quiet
        for STOP_DRAIN_QUIET ms. What the queue's bound cannot hold goes to the spill file.

        Only senders that keep sending make it end on time, after STOP_DRAIN_LIMIT s.
        """
        deadline = time.monotonic() + STOP_DRAIN_LIMIT
        recent = set()  # senders heard in the last STILL_SENDING_WINDOW before the deadline
        overflowing = False  # once one batch went to the spill file, all after it do
        while not self.stops.cold.is_set():
            self.peers.read(monitor)
            if not sock.poll(STOP_DRAIN_QUIET):
                return
            now = time.monotonic()
            if now >= deadline:
                self.log_still_sending(recent)
                return
            room, byte_room = (0, 0) if overflowing else self.batches.wait_for_room(0)
            fits = room > 0 and byte_room > 0
            # A batch for the spill file is bounded like the queue, in messages and bytes.
            batch = (self.receive(sock, min(BATCH_MAX, room), byte_room) if fits
                     else self.receive(sock, BATCH_MAX, self.config.queue_bytes))
            if batch is None:
                continue
            if now >= deadline - STILL_SENDING_WINDOW and len(recent) < STILL_SENDING_COUNTED:
                recent.update((msg[RUN], msg[WORKER] or msg[CLIENT]) for msg in batch.items)
            if fits:
                self.batches.put_past_bound(batch)  # it fits: taken up to the bound
            elif not self.spill_overflow(batch):
                return
            else:
                overflowing = True

    def spill_overflow(self, batch):
        """Save a batch beyond the queue's bound to the spill file; False if it failed."""
        try:
            self.overflow.write(batch.items)
        except OSError:
            self.log.error(f"[SPILL] cannot write {self.overflow.temporary}:"
                           f" {self.overflow.error}; stopped taking messages off the socket")
            return False
        return True

    def log_still_sending(self, recent):
        """The drain ran out of time: messages were still arriving; say from how many."""
        senders = (f"at least {len(recent)}" if len(recent) >= STILL_SENDING_COUNTED
                   else str(len(recent)))
        self.log.warning(f"[STOP] still receiving after {STOP_DRAIN_LIMIT:g} s: messages from"
                         f" {senders} sender workers arrived in the last"
                         f" {STILL_SENDING_WINDOW:g} s ({self.counters.peers} connections open);"
                         " what is still on its way is not received (its senders counted it"
                         " as sent: --confirm resends it)")

    def invalid(self, reason):
        """Count a message dropped as invalid, and say why (rate-limited)."""
        self.counters.invalid += 1
        self.warnings.warning("invalid", f"[INVALID] message dropped: {logs.shown(reason)}"
                              f" (invalid so far: {self.counters.invalid})")


# ---------------------------------------------------------------------------
# The processor thread: queue -> work
# ---------------------------------------------------------------------------
class ProcessorThread(threads.ServiceThread):
    """Takes batches off the queue and works each message; its RunLedger accounts them
    to their sender runs and tells --confirm senders what was processed."""

    def __init__(self, ctx, config, server_keys, batches, counters, stops, log):
        super().__init__("processor", log)
        self.ctx = ctx
        self.config = config
        self.server_keys = server_keys
        self.batches = batches
        self.counters = counters
        self.stops = stops
        self.runs = runs.RunLedger(counters, log, logs.RateLimitedLog(log, WARNING_INTERVAL))
        self.server = f"Server:{config.port}"
        self.lines = None  # the current batch's [PROC] lines, when logged together
        self._next_silence_check = 0.0

    def serve(self):
        """Bind the confirmation socket, then process until a stop."""
        with open_confirm_socket(self.ctx, self.config, self.server_keys) as sock:
            confirms = confirm.ConfirmPublisher(sock, CONFIRM_INTERVAL)
            self.runs.reports = confirms  # each run's report goes out as its [RUN] line is logged
            try:
                self.started()
                self.process_until_stop(confirms)
                confirms.publish()
            finally:
                self.runs.reports = None  # the socket closes: later [RUN] lines are only logged

    def process_until_stop(self, confirms):
        """Process batches until a cold stop, or a warm one once all received is processed."""
        while not self.stops.cold.is_set():
            try:
                batch = self.batches.get(timeout=POLL_S)
            except queue.Empty:
                if self.stops.receive_done.is_set() and self.batches.empty():
                    return  # warm stop: everything received has been processed
                self.service_actions(confirms, idle=True)
                continue
            self.process(batch, confirms)
            self.service_actions(confirms, idle=False)

    def process(self, batch, confirms):
        """Work a batch's messages in order, each recorded in its run once its work is done.

        A cold stop puts the messages not done back at the front of the queue.
        """
        self.lines = None if self.config.quiet else logs.LineBlock()
        # None: no simulated work and no [PROC] line, so nothing to do per message.
        work = self.work if self.config.processing_time or self.lines is not None else None
        done = self.runs.process(batch.items, batch.recv_ns, work, confirms)
        if self.lines:
            self.log.info(self.lines)
        if done < len(batch.items):
            self.batches.put_front(batch.rest(done))
        elif batch.recovered:
            self.remove_spill_file()

    def work(self, msg):
        """The simulated work of one message, then its [PROC] line; False if a cold stop
        came first."""
        if self.config.processing_time:
            if self.stops.cold.wait(self.config.processing_time):
                return False
        if self.lines is not None:
            line = logs.proc_line(self.server, wire.client_name(msg), msg[TASK], msg[TEXT])
            if self.config.processing_time:
                self.log.info(line)  # each line as its work is done
            else:
                self.lines.append(line)
        return True

    def service_actions(self, confirms, idle):
        """Chores between batches: confirmations, and runs whose sender fell silent."""
        confirms.publish_if_due()
        now = time.monotonic()
        if idle or now >= self._next_silence_check:
            self._next_silence_check = now + SILENCE_CHECK_INTERVAL
            if not self.counters.backlog:  # a backlog is not a silent sender
                self.runs.report_silent(self.config.run_timeout)

    def remove_spill_file(self):
        """The spill file's messages are all processed: remove it."""
        path = self.config.spill_file
        try:
            if spill.remove(path):
                self.log.info(f"[SPILL] recovered messages processed; removed {path}")
        except OSError as exc:
            self.log.warning(f"[SPILL] could not remove {path}: {exc.strerror}")


# ---------------------------------------------------------------------------
# The run: start, wait for a stop, the stop sequence
# ---------------------------------------------------------------------------
class StopKind(enum.Enum):
    """How the receiver stopped."""

    WARM = "warm"  # backlog processed
    COLD = "cold"  # backlog written to the spill file
    FAILED = "failed"  # a thread died


def serve(config, signals, log):
    """Own the spill file for the whole run; serve() does the rest."""
    lock = spill.SpillLock(config.spill_file)
    try:
        lock.acquire()
    except spill.SpillError as exc:
        log.error(f"[ERROR] {exc}")
        return EXIT_STARTUP_FAILED
    try:
        return serve_with_spill_file(config, signals, log)
    finally:
        lock.release()


def serve_with_spill_file(config, signals, log):
    """Start both threads, wait for a stop, shut down in order, report."""
    counters = Counters()
    try:
        recovered, counters.invalid = recover_spill(config.spill_file, log)
        server_keys = security.load_server_keys(config.curve_server_key, config.curve_allow)
    except (spill.SpillError, security.KeyFileError) as exc:
        log.error(f"[ERROR] {exc}")
        return EXIT_STARTUP_FAILED
    try:
        series = cli.CsvSeries(config.csv_path, CSV_COLUMNS)  # report() closes it
    except OSError as exc:
        log.error(f"[ERROR] cannot write --csv {config.csv_path}: {exc.strerror}")
        return EXIT_STARTUP_FAILED
    counters.recovered = count_data(recovered)
    curve = server_keys is not None
    security.security_warnings(log, config.bind, config.port, curve, config.curve_allow)
    started = time.monotonic()
    stops = flow.StopEvents()
    batches = flow.BatchQueue(config.queue_size, config.queue_bytes)
    run_cache = known_runs(recovered)
    saved = spill.SpillWriter(config.spill_file)  # the receive thread's drain, then main
    ctx = zmq.Context()
    gatekeeper = None
    try:
        gatekeeper = security.start_gatekeeper(ctx, log, config.allow_ips, curve,
                                               config.curve_allow, WARNING_INTERVAL)
        receiver = ReceiveThread(ctx, config, server_keys, batches, counters, stops, log,
                                 run_cache, saved)
        processor = ProcessorThread(ctx, config, server_keys, batches, counters, stops, log)
        if not start_threads(receiver, processor, recovered, config, log):
            return EXIT_STARTUP_FAILED
        log.info(f"[START] PULL socket bound to {config.endpoint} | confirmations and run"
                 f" reports on {config.confirm_endpoint} | processing time"
                 f" {config.processing_time:g} s | queue {config.queue_size} messages"
                 f"{' | log file ' + config.log_file if config.log_file else ''}")
        log.info("Server is running. Press Ctrl+C to stop.")
        rows = CsvRows(series, processor.runs, started)
        dead = wait_for_stop(signals, counters, config, log, (receiver, processor), rows)
        stop_kind = shut_down(dead, signals, receiver, processor, saved, log)
    finally:
        stops.cold.set()  # after an unexpected error: threads let go of their sockets
        if gatekeeper is not None:
            gatekeeper.stop()
        ctx.term()
    return report(counters, processor.runs, started, stop_kind, config, log, rows)


def known_runs(recovered):
    """wire.decode()'s run cache, knowing the recovered messages' runs: new frames of
    those runs must agree with them."""
    run_cache = {}
    for msg in recovered:
        info = msg[wire.RUN]
        if info is not None and info.run_id not in run_cache:
            wire.remember_run(run_cache, info)
    return run_cache


def recover_spill(path, log):
    """At start: what a spill file holds (messages, invalid count), after the checks;
    SpillError when it cannot be used. A file with nothing to process is removed."""
    if spill.remove_stale_temporary(path):
        log.warning(f"[SPILL] removed {path}{spill.TEMPORARY_SUFFIX}: a receiver was stopped"
                    " (killed?) while it saved its spill file; the messages it held are lost")
    recovered, invalid = spill.load(path)
    if not recovered and os.path.exists(path):
        # Nothing to process: counted once here, not again at every start.
        spill.remove(path)
        log.warning(f"[SPILL] {path} held no message to process ({invalid} invalid);"
                    " removed")
    return recovered, invalid


def count_data(messages):
    """How many of the messages carry a task (END frames do not)."""
    return sum(1 for msg in messages if msg[KIND] == DATA)


def start_threads(receiver, processor, recovered, config, log):
    """Start the receive thread, queue the recovered messages, start the processor thread;
    False, with the reason logged, when either cannot start."""
    error = receiver.start_and_wait()
    if error:
        log.error(f"[ERROR] {error}")
        threads.join_stopped([receiver], log)
        return False
    if recovered:  # a spill file's messages, processed ahead of anything new
        processor.batches.put_past_bound(flow.Batch(None, recovered, recovered=True))
        log.info(f"[SPILL] {count_data(recovered)} messages recovered from"
                 f" {config.spill_file}; processing them first")
    error = processor.start_and_wait()
    if error:
        log.error(f"[ERROR] {error}")
        processor.stops.cold.set()
        threads.join_stopped([receiver, processor], log)
        return False
    return True


def wait_for_stop(signals, counters, config, log, watched, rows):
    """Block until Ctrl+C/SIGTERM (returns None) or a thread of `watched` dies (returns it),
    printing [STATS] while busy and a --csv row every interval."""
    last = (counters.received, counters.processed)
    last_time = time.monotonic()
    while not signals.first.wait(POLL_S):
        for thread in watched:
            if not thread.is_alive():
                return thread
        now = time.monotonic()
        if now - last_time >= config.stats_interval:
            current = (counters.received, counters.processed)
            if current != last or counters.backlog:
                log.info(stats_line(counters, last, now - last_time))
            rows.add(counters, counters.backlog, cli.rate(current[1] - last[1], now - last_time))
            last, last_time = current, now
    return None


def finish_backlog(signals, receiver, processor, log):
    """Warm stop: stop receiving, then let the processor work the backlog for real.

    Every wait here can be cut short: a second signal turns the stop cold.
    """
    stops, batches = processor.stops, processor.batches
    stops.warm.set()
    wait_for_thread(receiver, signals, stops, log)
    saved = receiver.overflow.data  # final: the receive thread is done
    if processor.is_alive():
        beyond = (f"; {saved} more, beyond the queue's bound, go to the spill file"
                  if saved else "")
        log.info(f"[STOP] stopping: no new messages; processing the {batches.qsize()} waiting"
                 f"{beyond} (Ctrl+C again to stop at once and save them to the spill file)")
    next_progress = time.monotonic() + 1.0
    while processor.is_alive():
        wait_for_thread(processor, signals, stops, log, POLL_S)
        if time.monotonic() >= next_progress and processor.is_alive():
            log.info(f"[STOP] backlog: {batches.qsize()} messages left to process")
            next_progress += 1.0


def wait_for_thread(thread, signals, stops, log, timeout=None):
    """Join `thread` (at most `timeout` seconds); a second signal meanwhile makes the stop cold."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
        thread.join(POLL_S)
        if signals.second.is_set() and not stops.cold.is_set():
            stops.cold.set()
            log.warning("[STOP] second signal: stopping at once")


def shut_down(dead, signals, receiver, processor, saved, log):
    """The stop sequence, after a signal or a dead thread: stop receiving, finish the
    backlog (or not, on a cold stop), spill what is left, report open runs."""
    if dead is receiver:
        log.error("[ERROR] the receive thread stopped; processing what was received")
    elif dead is processor:
        log.error("[ERROR] the processor thread stopped; what was received goes to the"
                  " spill file")
    finish_backlog(signals, receiver, processor, log)
    leftovers = processor.batches.take_all()  # a cold stop put its unfinished batch back
    if leftovers or saved.started:
        save_spill(saved, leftovers, processor.counters, processor.runs, log)
    processor.runs.report_open()
    if dead is not None:
        return StopKind.FAILED
    return StopKind.COLD if processor.stops.cold.is_set() else StopKind.WARM


def save_spill(saved, leftovers, counters, ledger, log):
    """Complete the spill file: what the warm-stop drain put there, then what a cold
    stop left unprocessed. Counted once, for the [RUN] lines, runs[] and the summary."""
    try:
        saved.write(leftovers)
        saved.commit()
    except OSError:
        log.error(f"[SPILL] could not write {saved.path}: {saved.error}; {saved.lost}"
                  " received but unprocessed messages LOST")
        return
    counters.spilled = saved.data
    ledger.count_spilled(saved.runs)
    log.warning(f"[SPILL] {saved.data} received but unprocessed messages saved to"
                f" {saved.path}; the next start processes them first")


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
def report(counters, ledger, started, stop_kind, config, log, rows):
    """Print the summary (and write it as JSON with --json, its last --csv row); returns the
    exit status."""
    lost = counters.backlog - counters.spilled
    data = summary_data(counters, ledger, lost, started, stop_kind, config)
    text = summary_table(data)
    if not config.quiet and data["latency_ms"]["max"]:
        text += "\n" + "\n".join(ledger.latency().text_lines("Latency, every run"))
    log.info("\n" + text)
    rows.add(counters, lost, data["processed_per_s"])
    rows.close()
    saved = not config.json_path or cli.save_summary(config.json_path, data, log)
    return EXIT_OK if stop_kind is not StopKind.FAILED and not lost and saved else EXIT_FAILED


def summary_data(counters, ledger, queued, started, stop_kind, config):
    """The final summary, as the JSON written by --json."""
    duration = time.monotonic() - started
    return {
        **cli.run_facts(config),
        "received": counters.received + counters.recovered,
        "recovered": counters.recovered,
        "processed": counters.processed,
        "duplicates": counters.duplicates,
        "invalid": counters.invalid,
        "spilled": counters.spilled,
        "unprocessed": queued,
        "plain": counters.plain,
        "clock_skew": counters.clock_skew,
        "rejected": counters.rejected,
        "rejected_connections": counters.rejected_connections,
        "duration_s": round(duration, 3),
        "processed_per_s": round(cli.rate(counters.processed, duration), 1),
        "stop": stop_kind.value,
        "runs": ledger.to_json(),
        "latency_ms": ledger.latency().summary_ms(),
        "latency_raw_ms": ledger.latency(raw=True).summary_ms(),
        "runs_left_out": ledger.left_out,
    }


class CsvRows:
    """--csv: the receiver's rows (CSV_COLUMNS), counts cumulative since the start."""

    def __init__(self, series, ledger, started):
        self.series = series
        self.ledger = ledger
        self.started = started

    def add(self, counters, queue, rate):
        """One row: the counts now, `queue` messages waiting, `rate` msg/s processed."""
        lat = self.ledger.latency().summary_ms()
        self.series.row((round(time.monotonic() - self.started, 3),
                         counters.received + counters.recovered, counters.processed,
                         round(rate, 1), queue, lat["p50"], lat["p99"], lat["max"],
                         counters.invalid))

    def close(self):
        """Close the file (the last row is written)."""
        self.series.close()


def summary_table(data):
    """The aligned table printed at exit."""
    rows = [
        ("received", f"{data['received']}" + (f" ({data['recovered']} recovered from spill file)"
                                              if data["recovered"] else "")),
        ("processed", data["processed"]),
        ("duplicates", f"{data['duplicates']} (dropped: processed before)"),
        ("invalid", data["invalid"]),
        ("spilled", data["spilled"]),
        ("rejected", f"{data['rejected']} (CURVE / IP allow list)"),
        ("duration", f"{data['duration_s']:.2f} s"),
        ("rate", f"{data['processed_per_s']:.1f} msg/s processed over the receiver's lifetime,"
                 " idle time included (each run's own rate: its run row)"),
        ("stop", data["stop"]),
    ]
    if data["unprocessed"]:
        rows.append(("LOST", f"{data['unprocessed']} received but neither processed nor spilled"))
    if data["clock_skew"]:
        rows.append(("clock skew", f"{data['clock_skew']} send times out of"
                                   f" {runs.SENT_TIME_WINDOW} s of their receipt"
                                   " (not in the latencies)"))
    rows += [runs.run_row(entry) for entry in data["runs"]]
    if data["runs_left_out"]:
        rows.append(("runs left out", f"{data['runs_left_out']} older finished runs"
                                      f" (at most {runs.RUNS_LISTED} are kept)"))
    return cli.format_table("Receiver summary", rows)


def stats_line(counters, last, elapsed):
    """One [STATS] line; `last` holds the counts of the previous line."""
    received_rate = cli.rate(counters.received - last[0], elapsed)
    processed_rate = cli.rate(counters.processed - last[1], elapsed)
    return (f"[STATS] received {counters.received} ({received_rate:.1f}/s) | processed"
            f" {counters.processed} ({processed_rate:.1f}/s) | queue {counters.backlog}"
            f" | invalid {counters.invalid} | connections {counters.peers}")


def main(argv=None):
    """Run the receiver until Ctrl+C or SIGTERM; returns the exit status."""
    return cli.run_script("async-socket-receiver", parse_args(argv), serve,
                          EXIT_STARTUP_FAILED)


if __name__ == "__main__":
    sys.exit(main())
