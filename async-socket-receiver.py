#!/usr/bin/env python3
"""ZeroMQ PULL server: one receive thread feeds a queue, one processor thread works it.

Run it first, then async-socket-sender.py in a second terminal. Every constant
below can also be set by a command-line flag (--help lists them). Read from the top:
constants, the sockets, the receive thread, the processor thread, the run (serve:
start, stop sequence), the summary, then the flags (build_parser) and main().
Machinery lives in pushpull/.
"""

import argparse
import dataclasses
import enum
import functools
import queue
import sys
import time
from dataclasses import dataclass

import zmq

from pushpull import (channel, cli, gatekeeper, hlog, links, logs, metrics, receiveflow, runs,
                      security, spill, receiver_summary, threads, wire)
from pushpull.threads import POLL_INTERVAL, POLL_S
from pushpull.wire import TASK, TEXT

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
METRICS_PORT = None  # TCP port of the Prometheus endpoint (/metrics), or None: no endpoint
METRICS_BIND = "127.0.0.1"  # address the metrics endpoint listens on; "*": every interface
METRICS_HOLD = 5.0  # seconds at exit the final figures wait for a scrape (with METRICS_PORT)
HLOG_FILE = None  # path of an HdrHistogram log: latency per stats interval and run, or None

BATCH_MAX = 1000  # messages moved through the queue in one batch
HANDOVER_WAIT = 0.002  # seconds a batch put for an idle processor waits to be taken
HANDOVER_BATCH_MIN = 100  # messages in a batch before it waits to be taken (a flood's)
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to complete its ZeroMQ handshake
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt
CONFIRM_INTERVAL = 0.05  # seconds between confirmation messages to --confirm senders
WARNING_INTERVAL = 1.0  # seconds between two warnings of the same kind
SILENCE_CHECK_INTERVAL = 1.0  # seconds between checks for silent senders while busy



class ReceiverExit(enum.IntEnum):
    """The receiver's exit statuses."""

    OK = 0  # stopped by a signal, and every message taken off the socket processed or spilled
    FAILED = 1  # cannot start, a thread died, messages LOST, or the --json file not written
    BAD_COMMAND_LINE = 2  # as argparse exits for a bad flag
    INTERRUPTED = 130  # a third Ctrl+C / SIGTERM: exits at once (pushpull/stopsignals.py)


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
        self.unsettled = 0  # receive thread, at its end: PeerWatch's drop guesses not settled
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
        self.peers = gatekeeper.PeerWatch(counters, self.warnings, curve=bool(server_keys),
                                          settle=HANDSHAKE_TIMEOUT)
        self.run_cache = run_cache  # wire.decode()'s: a run's header bytes -> its RunInfo
        self.target = f"Server:{config.bind}:{config.port}"

    def serve(self):
        """Bind the PULL socket, then receive until a stop."""
        try:
            with open_pull_socket(self.ctx, self.config, self.server_keys) as sock:
                monitor = sock.get_monitor_socket(gatekeeper.PEER_EVENTS)
                try:
                    self.started()
                    self.receive_until_stop(sock, monitor)
                    self.peers.report_guesses()
                    self.counters.unsettled = len(self.peers.guesses)  # in no count
                finally:
                    sock.disable_monitor()
                    monitor.close(linger=0)
        finally:
            self.overflow.flush()  # for main, which reads back what the drain saved

    def receive_until_stop(self, sock, monitor):
        """Move messages from the socket to the queue; on a warm stop, drain, then return."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while not self.stops.cold.is_set():
            if self.stops.warm.is_set():  # take what is already on its way, then stop
                drain = receiveflow.StopDrain(self.receive, self.batches, self.overflow, BATCH_MAX,
                                       self.log)
                drain.run(sock, monitor, self.peers, self.stops.cold)
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
        batch = receiveflow.Batch(time.time_ns(), messages, nbytes=size)
        first = self.counters.received + 1
        self.counters.received += len(messages) - ends  # END frames are bookkeeping
        if not self.config.quiet:
            lines = logs.msg_lines(messages, first, self.target)  # [MSG], one record
            if lines:
                self.log.info(lines)
        return batch

    def hand_over(self, batch):
        """Queue a batch, waiting for room; once a stop has come, past the bound."""
        # A small batch (a trickle, not a flood) is not held up: its processor has
        # little to contend with, and the latency of what arrives meanwhile counts.
        handover = HANDOVER_WAIT if len(batch.items) >= HANDOVER_BATCH_MIN else 0
        while not (self.stops.warm.is_set() or self.stops.cold.is_set()):
            try:
                self.batches.put_handing_over(batch, POLL_S, handover)
                return
            except queue.Full:
                continue
        self.batches.put_past_bound(batch)

    def invalid(self, reason):
        """Count a message dropped as invalid, and say why (rate-limited)."""
        self.counters.invalid += 1
        self.warnings.warning("invalid", f"[INVALID] message dropped: {logs.shown(reason)}"
                              f" (invalid so far: {self.counters.invalid})")


# ---------------------------------------------------------------------------
# The processor thread: queue -> work
# ---------------------------------------------------------------------------
class ProcessorThread(threads.ServiceThread):
    """Takes batches off the queue and works each message (work_each(); with nothing to do
    per message, the RunLedger's fast path); its RunLedger accounts them to their sender
    runs (its RunTable reports each run) and tells --confirm senders what was processed."""

    def __init__(self, ctx, config, server_keys, batches, counters, stops, log):
        super().__init__("processor", log)
        self.ctx = ctx
        self.config = config
        self.server_keys = server_keys
        self.batches = batches
        self.counters = counters
        self.stops = stops
        warnings = logs.RateLimitedLog(log, WARNING_INTERVAL)
        self.runs = runs.RunTable(counters, log, warnings)  # each run kept, and reported
        self.ledger = runs.RunLedger(counters, self.runs, warnings)  # each message to its run
        self.server = f"Server:{config.port}"
        self.lines = None  # the current batch's [PROC] lines, when logged together
        self._next_silence_check = 0.0

    def serve(self):
        """Bind the confirmation socket, then process until a stop."""
        with open_confirm_socket(self.ctx, self.config, self.server_keys) as sock:
            confirms = channel.ConfirmPublisher(sock, CONFIRM_INTERVAL)
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
        if self.config.processing_time or self.lines is not None:
            done = self.work_each(batch.items, batch.recv_ns, confirms)
        else:  # nothing to do per message: the ledger counts them a stretch at a time
            done = self.ledger.record_batch(batch.items, batch.recv_ns, confirms)
        if self.lines:
            self.log.info(self.lines)
        if done < len(batch.items):
            self.batches.put_front(batch.rest(done))
        elif batch.recovered:
            spill.remove_processed(self.config.spill_file, self.log)

    def work_each(self, messages, received_ns, confirms):
        """The seed's loop: for each message, skip a duplicate, do the work, record it.
        Returns how many were taken: fewer when a cold stop came first."""
        ledger = self.ledger
        ledger.begin(received_ns)
        for index, msg in enumerate(messages):
            if not ledger.admit(msg, confirms):  # a duplicate, or an END frame: counted
                continue
            if not self.work(msg):
                return index  # process() puts this one and the rest back
            ledger.record(msg, confirms)
        ledger.end()
        return len(messages)

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


# ---------------------------------------------------------------------------
# The run: start, wait for a stop, the stop sequence
# ---------------------------------------------------------------------------
class StopKind(enum.Enum):
    """How the receiver stopped."""

    WARM = "warm"  # backlog processed
    COLD = "cold"  # backlog written to the spill file
    FAILED = "failed"  # a thread died


def serve(config, signals, log, exporter):
    """Own the spill file (its lock) for the whole run; serve_with_spill_file() does the rest."""
    lock = spill.SpillLock(config.spill_file)
    try:
        lock.acquire()
    except spill.SpillError as exc:
        # Another receiver on the same port shares the default spill file: its port is
        # the real conflict (a new --port gives a new spill file too), so it is said first.
        log.error(f"[ERROR] {port_conflict(config) or exc}")
        return ReceiverExit.FAILED
    counters = Counters()
    signals.last_words = lambda: last_words(counters, lock)  # a third Ctrl+C
    try:
        return serve_with_spill_file(config, signals, log, counters, exporter)
    finally:
        lock.release()


def last_words(counters, lock):
    """What a third Ctrl+C, exiting at once, drops (said on its line); the lock removed."""
    lock.release()
    dropped = counters.backlog - counters.spilled
    return f"; {dropped} received but unprocessed messages dropped, not in the spill file"


def port_conflict(config):
    """Why the PULL socket could not bind its port, tried on a socket closed at once; None
    if it could."""
    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as sock:
        sock.linger = 0
        sock.ipv6 = cli.wants_ipv6([config.endpoint])
        try:
            sock.bind(config.endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EADDRINUSE:
                return cli.bind_error(config.endpoint, f"port {config.port}", config.bind, exc)
    return None


def serve_with_spill_file(config, signals, log, counters, exporter):
    """Read back the spill file, load the keys, open the --csv file; then run_threads()."""
    try:
        recovered, counters.invalid = spill.recover(config.spill_file, log)
        server_keys = security.load_server_keys(config.curve_server_key, config.curve_allow)
    except (spill.SpillError, security.KeyFileError) as exc:
        log.error(f"[ERROR] {exc}")
        return ReceiverExit.FAILED
    try:
        # report() closes it
        series = cli.CsvSeries(config.csv_path, receiver_summary.RECEIVER_CSV_COLUMNS)
    except OSError as exc:
        log.error(f"[ERROR] cannot write --csv {config.csv_path}: {exc.strerror}")
        return ReceiverExit.FAILED
    counters.recovered = spill.count_data(recovered)
    curve = server_keys is not None
    gatekeeper.security_warnings(log, config.bind, config.port, curve, config.curve_allow)
    return run_threads(config, signals, log, counters, recovered, server_keys, series, exporter)


def run_threads(config, signals, log, counters, recovered, server_keys, series, exporter):
    """Start both threads, wait for a stop, shut down in order, report; then hold the final
    figures for a last scrape (--metrics-port)."""
    started = time.monotonic()
    stops = receiveflow.StopEvents()
    batches = receiveflow.BatchQueue(config.queue_size, config.queue_bytes)
    run_cache = spill.known_runs(recovered)
    saved = spill.SpillWriter(config.spill_file)  # the receive thread's drain, then main
    ctx = zmq.Context()
    keeper = None
    latencies = hlog.NoLog()  # --hlog: each run's latency per stats interval
    try:
        try:
            keeper = gatekeeper.start_gatekeeper(ctx, log, config.allow_ips,
                                                 server_keys is not None,
                                                 config.curve_allow, WARNING_INTERVAL)
        except gatekeeper.GatekeeperError as exc:  # its sockets closed: ctx.term() returns
            log.error(f"[ERROR] {exc}")
            return ReceiverExit.FAILED
        receiver = ReceiveThread(ctx, config, server_keys, batches, counters, stops, log,
                                 run_cache, saved)
        processor = ProcessorThread(ctx, config, server_keys, batches, counters, stops, log)
        try:
            latencies = hlog.open_log(config.hlog, "pushpull receiver: latency of each run",
                                      hlog.run_latencies(processor.runs),
                                      config.stats_interval, started, log)
        except OSError as exc:
            log.error(f"[ERROR] cannot write --hlog {config.hlog}: {exc.strerror}")
            return ReceiverExit.FAILED
        if not start_threads(receiver, processor, recovered, config, log):
            return ReceiverExit.FAILED
        exporter.watch(metrics.ReceiverSource(counters, processor.runs, batches), log)
        log.info(logs.continued(
            f"[START] PULL socket bound to {config.endpoint} | processing time"
            f" {config.processing_time:g} s | queue {config.queue_size} messages",
            [f"confirmations and run reports on {config.confirm_endpoint}",
             *([f"log file {config.log_file}"] if config.log_file else [])]))
        log.info("Server is running. Press Ctrl+C to stop.")
        stats = receiver_summary.ReceiverStats(counters, processor.runs, series,
                                               config.stats_interval, log, started)
        dead = wait_for_stop(signals, (receiver, processor), hlog.Ticks(stats, latencies))
        stop_kind = shut_down(dead, signals, receiver, processor, saved, log)
    finally:
        stops.cold.set()  # after an unexpected error: threads let go of their sockets
        if keeper is not None:
            keeper.stop()
        ctx.term()
        latencies.close(time.monotonic())  # its last interval: every run is reported
    status = report(counters, processor.runs, started, stop_kind, config, log, stats)
    exporter.hold(config.metrics_hold, signals)
    return status


def start_threads(receiver, processor, recovered, config, log):
    """Start the receive thread, queue the recovered messages, start the processor thread;
    False, with the reason logged, when either cannot start."""
    error = receiver.start_and_wait()
    if error:
        log.error(f"[ERROR] {error}")
        threads.join_stopped([receiver], log)
        return False
    if recovered:  # a spill file's messages, processed ahead of anything new
        processor.batches.put_past_bound(receiveflow.Batch(None, recovered, recovered=True))
        log.info(f"[SPILL] {spill.count_data(recovered)} messages recovered from"
                 f" {config.spill_file}; processing them first")
    error = processor.start_and_wait()
    if error:
        log.error(f"[ERROR] {error}")
        processor.stops.cold.set()
        threads.join_stopped([receiver, processor], log)
        return False
    return True


def wait_for_stop(signals, watched, stats):
    """Block until Ctrl+C/SIGTERM (returns None) or a thread of `watched` dies (returns it);
    meanwhile, every interval, [STATS] while busy and a --csv row (`stats`)."""
    while not signals.first.wait(POLL_S):
        for thread in watched:
            if not thread.is_alive():
                return thread
        stats.tick(time.monotonic())
    return None


def finish_backlog(signals, receiver, processor, log):
    """Warm stop: stop receiving, then let the processor work the backlog for real, what
    the drain saved beyond the queue's bound included (read back in bounded batches).
    Returns the DrainFeed of that overflow when a cold stop left part of it unread.

    Every wait here can be cut short: a second signal turns the stop cold.
    """
    stops, counters = processor.stops, processor.counters
    stops.warm.set()
    if signals.first.is_set():  # at once: the drain below may take STOP_DRAIN_LIMIT
        log.info("[STOP] signal: taking in what is already on its way, then processing"
                 " the backlog")
    stops.join(receiver, signals, log)
    overflow = receiver.overflow.data  # final: the receive thread is done
    if processor.is_alive():
        beyond = (f" ({overflow} of them beyond the queue's bound, in {receiver.overflow.path}"
                  f"{spill.DRAIN_SUFFIX} meanwhile)" if overflow else "")
        log.info(f"[STOP] stopping: no new messages; processing the {counters.backlog}"
                 f" waiting{beyond} (Ctrl+C again to stop at once and save them to the"
                 " spill file)")
    progress = BacklogProgress(counters, log)
    feed = None
    if overflow and processor.is_alive() and not stops.cold.is_set():
        feed = read_back_overflow(signals, receiver, processor, progress, log)
    stops.receive_done.set()  # nothing more comes: the processor ends with the queue
    while processor.is_alive():
        stops.join(processor, signals, log, POLL_S)
        progress.tick(processor.is_alive())
    return feed


class BacklogProgress:
    """The stop's [STOP] backlog line, once a second, while the count goes down."""

    def __init__(self, counters, log):
        self.counters = counters
        self.log = log
        self.next = time.monotonic() + 1.0
        self.last = None

    def tick(self, busy):
        """Log the backlog if a second has passed (and it changed since the last line)."""
        if not busy or time.monotonic() < self.next:
            return
        self.next += 1.0
        left = self.counters.backlog
        if left != self.last:
            self.log.info(f"[STOP] backlog: {left} messages left to process")
            self.last = left


def read_back_overflow(signals, receiver, processor, progress, log):
    """Queue what the warm-stop drain saved beyond the queue's bound, in batches within
    the bound, for the processor; returns the DrainFeed if a cold stop (or the
    processor's end) left some unread (None when all were queued)."""
    stops, batches = processor.stops, processor.batches
    path = receiver.overflow.detach()
    if path is None:
        return None  # the file failed: save_at_stop counts its messages lost
    feed = spill.DrainFeed(path, BATCH_MAX, batches.maxbytes, receiver.run_cache)
    messages = feed.next()
    while messages is not None:
        batch = receiveflow.Batch(None, messages)  # no receive time kept: no latency
        while not stops.cold.is_set() and processor.is_alive():
            try:
                batches.put(batch, timeout=POLL_S)
                break
            except queue.Full:
                stops.check_second(signals, log)
                progress.tick(True)
        else:
            feed.hold(messages)
            return feed
        messages = feed.next()
    if feed.error:
        log.error(f"[SPILL] reading back {path}: {feed.error}; the messages after it are"
                  " LOST")
    feed.close()
    return None


def shut_down(dead, signals, receiver, processor, saved, log):
    """The stop sequence, after a signal or a dead thread: stop receiving, finish the
    backlog (or not, on a cold stop), spill what is left, report open runs."""
    if dead is receiver:
        log.error("[ERROR] the receive thread stopped; processing what was received")
    elif dead is processor:
        log.error("[ERROR] the processor thread stopped; what was received goes to the"
                  " spill file")
    feed = finish_backlog(signals, receiver, processor, log)
    leftovers = processor.batches.take_all()  # a cold stop put its unfinished batch back
    if leftovers or saved.started or feed is not None:
        spill.save_at_stop(saved, leftovers, processor.counters, processor.runs, log, feed)
    processor.runs.report_open()
    if dead is not None:
        return StopKind.FAILED
    return StopKind.COLD if processor.stops.cold.is_set() else StopKind.WARM


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
def report(counters, run_table, started, stop_kind, config, log, stats):
    """Print the summary (and write it as JSON with --json, its last --csv row); returns the
    exit status."""
    lost = counters.backlog - counters.spilled
    data = receiver_summary.receiver_data(counters, run_table, lost, started, stop_kind, config)
    text = receiver_summary.receiver_table(data)
    if not config.quiet and data["latency_ms"]["max"]:
        text += "\n" + "\n".join(run_table.latency().text_lines("Latency, every run"))
    log.info("\n" + text)
    stats.last_row(lost)
    stats.close()
    saved = not config.json_path or cli.save_summary(config.json_path, data, log)
    failed = stop_kind is StopKind.FAILED or lost or not saved
    return ReceiverExit.FAILED if failed else ReceiverExit.OK


# ---------------------------------------------------------------------------
# Configuration: the flags, read into a Config
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
    metrics_port: "int | None"
    metrics_bind: str
    metrics_hold: float
    hlog: "str | None"

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
        formatter_class=cli.HelpFormatter)
    sockets = p.add_argument_group("sockets")
    sockets.add_argument("--port", type=cli.port, default=TCP_PORT,
                         help="TCP port to bind (TCP_PORT)")
    sockets.add_argument("--confirm-port", metavar="PORT", type=cli.port,
                         default=CONFIRM_PORT,
                         help="port of the confirmation socket; default: --port + 1"
                              " (CONFIRM_PORT)")
    sockets.add_argument("--bind", metavar="ADDRESS", type=cli.bind_address,
                         default=BIND_ADDRESS,
                         help="interface to bind, * for all, :: for all IPv6 too (BIND_ADDRESS)")
    sockets.add_argument("--hwm", metavar="N", type=cli.count(1, cli.MAX_HWM),
                         default=RECEIVE_HWM,
                         help="ZeroMQ receive high-water mark (RECEIVE_HWM)")
    sockets.add_argument("--max-size", metavar="BYTES", type=cli.count(1, cli.MAX_FRAME_SIZE),
                         default=MAX_MESSAGE_SIZE,
                         help="largest message accepted (MAX_MESSAGE_SIZE)")
    load = p.add_argument_group("load")
    load.add_argument("--processing-time", metavar="SECONDS",
                      type=cli.seconds(0, cli.MAX_SECONDS), default=PROCESSING_TIME,
                      help="simulated work per message (PROCESSING_TIME)")
    load.add_argument("--queue-size", metavar="N", type=cli.count(1, cli.MAX_QUEUE_SIZE),
                      default=QUEUE_MAXSIZE, help="messages the queue holds (QUEUE_MAXSIZE)")
    load.add_argument("--queue-bytes", metavar="BYTES", type=cli.count(1, cli.MAX_QUEUE_BYTES),
                      default=QUEUE_MAXBYTES,
                      help="bytes of messages the queue holds (QUEUE_MAXBYTES)")
    delivery = p.add_argument_group("delivery")
    delivery.add_argument("--spill-file", metavar="PATH", default=SPILL_FILE,
                          help="where unprocessed messages are saved at a stop, for the next"
                               " start; {port} becomes the --port (SPILL_FILE)")
    delivery.add_argument("--run-timeout", metavar="SECONDS",
                          type=cli.seconds(cli.MIN_INTERVAL, cli.MAX_SECONDS),
                          default=RUN_IDLE_TIMEOUT,
                          help="silence before an unfinished run is reported (RUN_IDLE_TIMEOUT)")
    security_flags = p.add_argument_group("security")
    security_flags.add_argument("--curve-server-key", metavar="FILE", default=CURVE_SERVER_KEY,
                                help="receiver's secret certificate: turns CURVE on"
                                     " (CURVE_SERVER_KEY)")
    security_flags.add_argument("--curve-allow", metavar="DIR", default=CURVE_ALLOW_DIR,
                                help="public certificates of allowed clients (CURVE_ALLOW_DIR)")
    security_flags.add_argument("--allow-ip", metavar="ADDRESS", type=cli.ip_address,
                                action="append", default=argparse.SUPPRESS,
                                help=f"client address allowed in, repeatable (ALLOWED_IPS)"
                                     f" (default: {' '.join(ALLOWED_IPS) or 'any address'})")
    cli.add_key_flag(security_flags)
    output = p.add_argument_group("output")
    output.add_argument("--log-file", metavar="PATH", default=LOG_FILE,
                        help="log file (LOG_FILE)")
    output.add_argument("--no-file-log", action="store_true", default=not ENABLE_FILE_LOGGING,
                        help="log to the console only (ENABLE_FILE_LOGGING = False)")
    cli.add_report_flags(output, QUIET, STATS_INTERVAL, JSON_SUMMARY, CSV_FILE)
    cli.add_live_flags(output, METRICS_PORT, METRICS_BIND, METRICS_HOLD, HLOG_FILE)
    return p


def parse_args(argv=None):
    """Read the command line into a Config."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.curve_allow and not a.curve_server_key:
        p.error("--curve-allow needs --curve-server-key")
    try:
        confirm_port = channel.confirm_port(a.port, a.confirm_port)
    except ValueError as exc:
        p.error(str(exc))
    spill_file = a.spill_file.replace("{port}", str(a.port))
    cli.check_output_path(p, "--spill-file", spill_file)
    cli.check_output_path(p, "--json", a.json)
    cli.check_output_path(p, "--csv", a.csv)
    cli.check_live_flags(p, a)
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(Config) if hasattr(a, f.name)}
    return Config(**{**flags, "confirm_port": confirm_port, "spill_file": spill_file,
                     "log_file": None if a.no_file_log else a.log_file, "json_path": a.json,
                     "csv_path": a.csv, "allow_ips": tuple(getattr(a, "allow_ip", ALLOWED_IPS))})


def main(argv=None):
    """Run the receiver until Ctrl+C or SIGTERM; returns the exit status."""
    config = parse_args(argv)
    with metrics.start("async-socket-receiver", "receiver", config.metrics_port,
                       config.metrics_bind) as exporter:  # exit 2 if its port is taken
        return cli.run_script("async-socket-receiver", config,
                              functools.partial(serve, exporter=exporter), ReceiverExit.FAILED)


if __name__ == "__main__":
    sys.exit(main())
