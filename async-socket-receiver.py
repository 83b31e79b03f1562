#!/usr/bin/env python3
"""ZeroMQ PULL server: one receive thread feeds a queue, one processor thread works it.

Run it first, then async-socket-sender.py in a second terminal. Every constant
below can also be set by a command-line flag (--help lists them).
"""

import argparse
import enum
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from pushpull import cli, confirm, logs, runs, security, wire
from pushpull.wire import DATA, END, KIND, RAW, RUN, SEQ, TEXT, WORKER

# ---------------------------------------------------------------------------
# Constants: edit these to tune a run, or pass the matching flag
# ---------------------------------------------------------------------------
TCP_PORT = 5560  # TCP port the PULL socket binds
BIND_ADDRESS = "*"  # interface to bind: "*" is every interface
ENABLE_FILE_LOGGING = True  # also write the log to LOG_FILE
LOG_FILE = "server_logs.txt"  # path of the log file
PROCESSING_TIME = 0.1  # seconds of simulated work per message
QUEUE_MAXSIZE = 10000  # messages waiting between the receive and processor threads
RECEIVE_HWM = 200  # messages ZeroMQ may buffer per sender connection (ZMQ_RCVHWM)
MAX_MESSAGE_SIZE = 1048576  # bytes; ZeroMQ drops a peer that sends more (ZMQ_MAXMSGSIZE)
QUIET = False  # True: no per-message lines, only [STATS], [RUN] and the summary
STATS_INTERVAL = 5.0  # seconds between [STATS] lines while there is work
JSON_SUMMARY = None  # path to write the final summary as JSON, or None
SPILL_FILE = "receiver_spill.bin"  # where a cold stop saves unprocessed messages
RUN_IDLE_TIMEOUT = 15.0  # seconds of silence before an unfinished sender run is reported
CONFIRM_PORT = None  # TCP port of the confirmation PUB socket; None: TCP_PORT + 1
CURVE_SERVER_KEY = None  # path of the receiver's secret certificate; None: no encryption
CURVE_ALLOW_DIR = None  # directory of allowed clients' public certificates; None: any key
ALLOWED_IPS = []  # client addresses allowed in (ZAP); empty: every address
ZAP_DOMAIN = "global"  # the ZAP domain the PULL socket and the authenticator share

POLL_INTERVAL = 100  # milliseconds a thread blocks before it looks at the stop events
BATCH_MAX = 1000  # messages moved through the queue in one batch
STOP_DRAIN_QUIET = 50  # milliseconds without a message that end the warm-stop drain
STOP_DRAIN_LIMIT = 5.0  # seconds the warm-stop drain may take while senders keep sending
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to complete its ZeroMQ handshake
SOCKET_BUFFER = 65536  # bytes of kernel buffer per connection: keeps backpressure prompt
CONFIRM_INTERVAL = 0.05  # seconds between confirmation messages to --confirm senders
WARNING_INTERVAL = 1.0  # seconds between two warnings of the same kind
MISSING_LISTED = 20  # a [RUN] line lists missing task numbers up to this many
SPILL_MAGIC = b"ZPPSPILL1\n"  # first bytes of a spill file

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

    @property
    def endpoint(self):
        """The address the PULL socket binds."""
        return f"tcp://{self.bind}:{self.port}"

    @property
    def confirm_endpoint(self):
        """The address of the PUB socket that confirms processed tasks to senders."""
        return f"tcp://{self.bind}:{self.confirm_port}"


def build_parser():
    """The command line: one flag per tuning constant, defaults from the constants."""
    p = argparse.ArgumentParser(
        description="ZeroMQ PULL receiver: receive thread -> queue -> processor thread.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--port", type=cli.positive(int), default=TCP_PORT,
                   help="TCP port to bind (TCP_PORT)")
    p.add_argument("--confirm-port", metavar="PORT", type=cli.positive(int),
                   default=CONFIRM_PORT,
                   help="port of the confirmation socket; default: --port + 1 (CONFIRM_PORT)")
    p.add_argument("--bind", metavar="ADDRESS", default=BIND_ADDRESS,
                   help="interface to bind, * for all (BIND_ADDRESS)")
    p.add_argument("--processing-time", metavar="SECONDS", type=cli.non_negative(float),
                   default=PROCESSING_TIME, help="simulated work per message (PROCESSING_TIME)")
    p.add_argument("--queue-size", metavar="N", type=cli.positive(int),
                   default=QUEUE_MAXSIZE, help="messages the queue holds (QUEUE_MAXSIZE)")
    p.add_argument("--hwm", metavar="N", type=cli.positive(int), default=RECEIVE_HWM,
                   help="ZeroMQ receive high-water mark (RECEIVE_HWM)")
    p.add_argument("--max-size", metavar="BYTES", type=cli.positive(int),
                   default=MAX_MESSAGE_SIZE, help="largest message accepted (MAX_MESSAGE_SIZE)")
    p.add_argument("--log-file", metavar="PATH", default=LOG_FILE,
                   help="log file (LOG_FILE)")
    p.add_argument("--no-file-log", action="store_true", default=not ENABLE_FILE_LOGGING,
                   help="log to the console only (ENABLE_FILE_LOGGING = False)")
    cli.add_report_flags(p, QUIET, STATS_INTERVAL, JSON_SUMMARY)
    p.add_argument("--spill-file", metavar="PATH", default=SPILL_FILE,
                   help="where a cold stop saves unprocessed messages (SPILL_FILE)")
    p.add_argument("--run-timeout", metavar="SECONDS", type=cli.positive(float),
                   default=RUN_IDLE_TIMEOUT,
                   help="silence before an unfinished run is reported (RUN_IDLE_TIMEOUT)")
    p.add_argument("--curve-server-key", metavar="FILE", default=CURVE_SERVER_KEY,
                   help="receiver's secret certificate: turns CURVE on (CURVE_SERVER_KEY)")
    p.add_argument("--curve-allow", metavar="DIR", default=CURVE_ALLOW_DIR,
                   help="public certificates of allowed clients (CURVE_ALLOW_DIR)")
    p.add_argument("--allow-ip", metavar="ADDRESS", action="append", default=argparse.SUPPRESS,
                   help=f"client address allowed in, repeatable (ALLOWED_IPS) (default:"
                        f" {' '.join(ALLOWED_IPS) or 'any address'})")
    return p


def parse_args(argv=None):
    """Read the command line into a Config."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.curve_allow and not a.curve_server_key:
        p.error("--curve-allow needs --curve-server-key")
    return Config(port=a.port, confirm_port=a.confirm_port or a.port + 1, bind=a.bind,
                  processing_time=a.processing_time,
                  queue_size=a.queue_size, hwm=a.hwm, max_size=a.max_size,
                  log_file=None if a.no_file_log else a.log_file, quiet=a.quiet,
                  stats_interval=a.stats_interval, json_path=a.json,
                  spill_file=a.spill_file, run_timeout=a.run_timeout,
                  curve_server_key=a.curve_server_key, curve_allow=a.curve_allow,
                  allow_ips=tuple(getattr(a, "allow_ip", ALLOWED_IPS)),
                  generate_keys=a.generate_keys)


# ---------------------------------------------------------------------------
# The queue between the two threads, and the spill file
# ---------------------------------------------------------------------------
class Batch:
    """Messages received together: decoded messages and the time they arrived."""

    __slots__ = ("recv_ns", "items", "recovered")

    def __init__(self, recv_ns, items, recovered=False):
        self.recv_ns = recv_ns
        self.items = items
        self.recovered = recovered


class BatchQueue(queue.Queue):
    """A queue.Queue of batches whose size and bound count messages, not batches."""

    def _init(self, maxsize):
        super()._init(maxsize)
        self.depth = 0

    def _qsize(self):
        return self.depth

    def _put(self, batch):
        self.queue.append(batch)
        self.depth += len(batch.items)

    def _get(self):
        batch = self.queue.popleft()
        self.depth -= len(batch.items)
        return batch

    def wait_for_room(self, timeout):
        """Wait until the queue has room; returns how many messages fit (0 on timeout)."""
        with self.not_full:
            self.not_full.wait_for(lambda: self.depth < self.maxsize, timeout)
            return max(0, self.maxsize - self.depth)

    def put_past_bound(self, batch):
        """Put a batch even when the queue is full: used only while stopping."""
        with self.mutex:
            self._put(batch)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def take_all(self):
        """Remove and return every queued message (for the spill file)."""
        with self.mutex:
            items = [msg for batch in self.queue for msg in batch.items]
            self.queue.clear()
            self.depth = 0
            self.not_full.notify_all()
            return items


class SpillError(Exception):
    """The spill file exists but cannot be read."""


def load_spill(path):
    """Read the raw frames a cold stop saved, or [] when there is no spill file."""
    try:
        with open(path, "rb") as spill:
            data = spill.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SpillError(f"cannot read spill file {path}: {exc.strerror}") from None
    if not data.startswith(SPILL_MAGIC):
        raise SpillError(f"spill file {path} is not a spill file (kept as it is)")
    frames, pos = [], len(SPILL_MAGIC)
    while pos < len(data):
        if pos + 4 > len(data):
            raise SpillError(f"spill file {path} is truncated (kept as it is)")
        size = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + size > len(data):
            raise SpillError(f"spill file {path} is truncated (kept as it is)")
        frames.append(data[pos:pos + size])
        pos += size
    return frames


def write_spill(path, frames):
    """Save raw frames so the next start processes them; atomic via a temporary file."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as spill:
        spill.write(SPILL_MAGIC)
        for frame in frames:
            spill.write(len(frame).to_bytes(4, "big"))
            spill.write(frame)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------
# Per-run accounting
# ---------------------------------------------------------------------------
class RunState:
    """What the receiver knows of one sender run: which tasks arrived, and how fast."""

    def __init__(self, info, now):
        self.info = info
        self.planned = info.planned
        self.next_task = [0] * (info.workers + 1)  # per worker: all tasks below arrived
        self.ahead = {}  # worker -> set of tasks that arrived before a missing one
        self.received = 0
        self.duplicates = 0
        self.resent = 0  # tasks marked as resends by a --confirm sender
        self.spilled = 0  # received tasks saved to the spill file by a cold stop
        self.to_confirm = []  # (worker, task) processed since the last confirmation sent
        self.ends = {}  # worker -> tasks it says it sent (END frame)
        self.latency = runs.LatencyHistogram()
        # Send times of processed tasks not yet in `latency`, and when their batch was
        # received (None for a spill file's): the histogram takes them once per batch.
        self.unrecorded = []
        self.unrecorded_received_ns = None
        self.last_seen = now
        self.closed = False
        self.reports = 0

    def record(self, worker, task):
        """Account one task; returns False for a duplicate."""
        expected = self.next_task[worker]
        if task == expected:
            expected += 1
            ahead = self.ahead.get(worker)
            if ahead:
                while expected in ahead:
                    ahead.remove(expected)
                    expected += 1
            self.next_task[worker] = expected
        elif task > expected:
            ahead = self.ahead.setdefault(worker, set())
            if task in ahead:
                self.duplicates += 1
                return False
            ahead.add(task)
        else:
            self.duplicates += 1
            return False
        self.received += 1
        return True

    def record_latencies(self):
        """Move the unrecorded send times into the latency histogram."""
        if self.unrecorded and self.unrecorded_received_ns:
            self.latency.add_batch(self.unrecorded_received_ns, self.unrecorded)
        self.unrecorded = []

    def forget(self, worker, task):
        """Undo record() for a task that was not processed after all (cold stop)."""
        ahead = self.ahead.setdefault(worker, set())
        if task in ahead:
            ahead.remove(task)
        else:
            # Tasks after it that were contiguous become "ahead" of the gap it leaves.
            ahead.update(range(task + 1, self.next_task[worker]))
            self.next_task[worker] = task
        self.received -= 1

    def missing_tasks(self, limit):
        """Up to `limit` (worker, task) pairs that have not arrived, and their count."""
        listed, count = [], 0
        per_worker = self.info.messages_per_worker
        for worker in range(1, self.info.workers + 1):
            ahead = self.ahead.get(worker, ())
            for task in range(self.next_task[worker], per_worker):
                if task not in ahead:
                    count += 1
                    if len(listed) < limit:
                        listed.append((worker, task))
        return listed, count

    @property
    def finished(self):
        """Every task arrived, or every worker sent its END frame."""
        return self.received >= self.planned or len(self.ends) >= self.info.workers

    def to_json(self):
        """The run's entry in the JSON summary."""
        listed, missing = self.missing_tasks(MISSING_LISTED)
        sent = sum(self.ends.values()) if len(self.ends) >= self.info.workers else None
        return {
            "run_id": wire.run_label(self.info.run_id),
            "workers": self.info.workers,
            "planned": self.planned,
            "sent_reported": sent,
            "received": self.received,
            "missing": missing if self.info.endpoints == 1 else None,
            "missing_tasks": [f"Pusher-{w}:{t}" for w, t in listed]
            if self.info.endpoints == 1 else [],
            "duplicates": self.duplicates,
            "spilled": self.spilled,
            "resent": self.resent,
            "confirm": self.info.confirm,
            "endpoints": self.info.endpoints,
            "complete": self.received >= self.planned,
            "latency_ms": self.latency.summary_ms(),
        }


def run_line(run, reason):
    """The one [RUN] line that reports a finished (or silent) sender run."""
    info = run.info
    lat = run.latency.summary_ms()
    if info.endpoints == 1:
        listed, missing = run.missing_tasks(MISSING_LISTED)
        shown = ", ".join(f"Pusher-{w}:{t}" for w, t in listed)
        more = f" ... +{missing - len(listed)}" if missing > len(listed) else ""
        missing_text = f"missing {missing}" + (f" ({shown}{more})" if missing else "")
        if run.spilled:
            missing_text += f", {run.spilled} of them in the spill file"
        received = f"received {run.received}/{run.planned}"
    else:
        missing_text = f"share of {info.endpoints} receivers"
        received = f"received {run.received} of {run.planned} planned"
    resent = f" | resent {run.resent}" if info.confirm else ""
    return (f"[RUN] run {wire.run_label(info.run_id)} | {received} | {missing_text}"
            f" | duplicates {run.duplicates}{resent} | latency p50 {lat['p50']:.2f} ms"
            f" p99 {lat['p99']:.2f} ms max {lat['max']:.2f} ms | {reason}")


# ---------------------------------------------------------------------------
# Counters shared by the threads: each field has exactly one writer
# ---------------------------------------------------------------------------
class Counters:
    """Totals for [STATS] and the summary."""

    def __init__(self):
        self.received = 0  # receive thread: taken off the socket
        self.recovered = 0  # main, before the threads start: read back from a spill file
        self.invalid = 0  # receive thread
        self.rejected = 0  # receive thread: peers refused by CURVE or the IP allow list
        self.rejected_connections = 0  # receive thread: handshakes of non-ZeroMQ peers
        self.peers = 0  # receive thread: connected peers (sender sockets and health probes)
        self.processed = 0  # processor thread
        self.duplicates = 0  # processor thread: tasks processed before, dropped
        self.plain = 0  # processor thread: messages in no sender run
        self.spilled = 0  # main

    @property
    def backlog(self):
        """Messages received but not yet processed: queued, or in the processor's hands."""
        return self.received + self.recovered - self.processed - self.duplicates


class StopEvents:
    """Warm stop (finish the backlog) and cold stop (stop now, spill the backlog)."""

    def __init__(self):
        self.warm = threading.Event()
        self.cold = threading.Event()
        self.receive_done = threading.Event()


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------
class ReceiveThread(threading.Thread):
    """Owns the PULL socket: binds it, drains it in batches, and feeds the queue."""

    def __init__(self, ctx, config, batches, counters, stops, log, server_keys=None):
        super().__init__(name="receiver", daemon=True)
        self.ctx = ctx
        self.server_keys = server_keys
        self.config = config
        self.batches = batches
        self.counters = counters
        self.stops = stops
        self.log = log
        self.warnings = logs.RateLimitedLog(log, WARNING_INTERVAL)
        self.ready = threading.Event()
        self.startup_error = None
        self.run_cache = {}
        self.links = LinkTally()
        self.target = f"Server:{config.bind}:{config.port}"

    def run(self):
        """Thread body: any unexpected error is logged with its traceback."""
        try:
            self._serve()
        except Exception:
            self.log.exception("[ERROR] receive thread failed")
        finally:
            self.ready.set()
            self.stops.receive_done.set()

    def _serve(self):
        sock = self.ctx.socket(zmq.PULL)
        try:
            self._configure(sock)
            try:
                sock.bind(self.config.endpoint)
            except zmq.ZMQError as exc:
                self.startup_error = bind_error_text(self.config, exc)
                return
            monitor = sock.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            try:
                self.ready.set()
                self._receive_loop(sock, monitor)
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
        finally:
            sock.close(linger=0)

    def _configure(self, sock):
        # No ZMTP heartbeats on this data socket: libzmq 4.3.5 aborts
        # (stream_engine_base.cpp:310, !_io_error) when a heartbeat fires on a
        # connection whose input is stopped at the high-water mark. The senders
        # watch the receiver's health instead, from a socket that carries no data.
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        # Loopback may otherwise buffer tens of MB per connection in the kernel,
        # hiding a slow receiver from its senders.
        sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_size)
        secure(sock, self.config, self.server_keys)

    def _receive_loop(self, sock, monitor):
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        pending = None
        while not self.stops.cold.is_set():
            if pending is not None:
                if self.stops.warm.is_set():
                    self.batches.put_past_bound(pending)
                    pending = None
                else:
                    try:
                        self.batches.put(pending, timeout=POLL_INTERVAL / 1000)
                        pending = None
                    except queue.Full:
                        continue
            if self.stops.warm.is_set():
                self._drain_for_stop(sock)
                break
            ready = dict(poller.poll(POLL_INTERVAL))
            if monitor in ready:
                self._connection_events(monitor)
            if sock in ready:
                # Take no more than the queue has room for: its bound is exact, and
                # what stays in the socket pushes back on the senders.
                room = self.batches.wait_for_room(POLL_INTERVAL / 1000)
                if room:
                    pending = self._drain(sock, min(BATCH_MAX, room))
        if pending is not None:
            self.batches.put_past_bound(pending)

    def _drain_for_stop(self, sock):
        """Warm stop: take what is already on its way (socket and TCP buffers), then stop.

        Bounded in time and to one more queue's worth of messages, so a sender that
        keeps flooding cannot grow memory or hold the stop up.
        """
        deadline = time.monotonic() + STOP_DRAIN_LIMIT
        room = self.config.queue_size
        while room > 0 and time.monotonic() < deadline and not self.stops.cold.is_set():
            if not sock.poll(STOP_DRAIN_QUIET):
                return
            batch = self._drain(sock, min(BATCH_MAX, room))
            if batch is not None:
                self.batches.put_past_bound(batch)
                room -= len(batch.items)
        if sock.poll(0):
            self.log.warning("[STOP] senders are still sending; messages not taken off the"
                             " socket by now are not received (their senders counted them"
                             " as sent: --confirm resends them)")

    def _drain(self, sock, limit):
        """Receive up to `limit` waiting messages without blocking; None if none were valid."""
        items = []
        append = items.append
        recv = sock.recv
        decode = wire.decode
        cache = self.run_cache
        ends = 0
        number = self.counters.received
        lines = None if self.config.quiet else logs.LineBlock()
        for _ in range(limit):
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(frame, cache)
            except wire.InvalidMessage as exc:
                if not self._skipped_multipart(sock):
                    self._invalid(str(exc))
                continue
            # Asking for RCVMORE costs four times a recv(): a frame in the wire format
            # is a whole message by itself and is not asked (README, Wire format).
            if msg[RUN] is None and self._skipped_multipart(sock):
                continue
            append(msg)
            if msg[KIND] == END:
                ends += 1  # END frames are bookkeeping, not messages
            elif lines is not None:
                number += 1
                lines.append(logs.msg_line(number, wire.client_name(msg), self.target,
                                               msg[SEQ], msg[TEXT]))
        # Stamped when the batch is off the socket: latencies never count a frame as
        # received before it was.
        recv_ns = time.time_ns()
        self.counters.received += len(items) - ends
        if lines:
            self.log.info(lines)
        return Batch(recv_ns, items) if items else None

    def _skipped_multipart(self, sock):
        """After a frame: if more parts follow, drop them all, count one invalid message."""
        if not sock.rcvmore:
            return False
        parts = 1
        while sock.rcvmore:
            sock.recv(copy=False)  # the rest of a message is already here
            parts += 1
        self._invalid(f"{parts}-frame message (the wire format has one frame)")
        return True

    def _invalid(self, reason):
        self.counters.invalid += 1
        self.warnings.warning("invalid", f"[INVALID] message dropped: {reason}"
                              f" (invalid so far: {self.counters.invalid})")

    def _connection_events(self, monitor):
        """Count peers, and connections refused or dropped before their handshake ended."""
        counters = self.counters
        links = self.links
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_ACCEPTED:
                links.accepted += 1
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                links.resolved(self)
                counters.peers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                if links.unresolved > 0:
                    # Junk bytes (or a peer gone mid-handshake): libzmq just drops them.
                    links.dropped += 1
                    self._invalid_connection("connection closed before a ZeroMQ handshake")
                else:
                    counters.peers = max(0, counters.peers - 1)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or (
                    event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and self.server_keys):
                # Refused by ZAP (logged with its address by the authenticator), or a
                # peer whose CURVE handshake could not work.
                links.resolved(self, failed=True)
                counters.rejected += 1
                if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    self.warnings.warning("auth-protocol", "[AUTH] refused a peer whose CURVE"
                                                           " handshake failed (no client key,"
                                                           " or a wrong server key)")
            else:
                links.resolved(self, failed=True)
                if self.server_keys:
                    continue  # with CURVE, the AUTH or PROTOCOL event counts the refusal
                self._invalid_connection(f"handshake failed ({zmq.Event(event).name})")

    def _invalid_connection(self, reason):
        self.counters.rejected_connections += 1
        self.counters.invalid += 1
        self.warnings.warning("handshake", f"[INVALID] connection dropped: not a ZeroMQ peer:"
                                           f" {reason}")


class LinkTally:
    """Connections by how their handshake ended, from the PULL socket's monitor events.

    libzmq reports no file descriptor with a successful handshake, so connections
    are matched in aggregate: a DISCONNECTED while some accepted connection has
    no handshake result yet is taken as a drop before the handshake. If a result
    then arrives that the drop made impossible, the guess is undone.
    """

    def __init__(self):
        self.accepted = 0
        self.handshakes = 0  # succeeded or failed
        self.dropped = 0  # closed before any handshake result

    @property
    def unresolved(self):
        """Accepted connections with no handshake result yet."""
        return self.accepted - self.handshakes - self.dropped

    def resolved(self, receiver, failed=False):
        """A handshake ended; correct an earlier drop that was really this connection's."""
        self.handshakes += 1
        if self.unresolved < 0:
            self.dropped -= 1
            receiver.counters.rejected_connections -= 1
            receiver.counters.invalid -= 1
        if failed:
            receiver.counters.peers += 1  # its DISCONNECTED follows and takes it off again


def secure(sock, config, server_keys):
    """CURVE server keys and the ZAP domain, when the receiver uses them."""
    # With a ZAP domain every peer passes the authenticator, and libzmq refuses
    # ZMTP/1.0 peers: without it, raw bytes on the port are read as old-protocol
    # frames and can come out as messages.
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT * 1000))
    if server_keys:
        public, secret = server_keys
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True


def bind_error_text(config, exc, confirm=False):
    """A one-line reason why the PULL (or the confirmation PUB) socket could not bind."""
    endpoint, port = ((config.confirm_endpoint, config.confirm_port) if confirm
                      else (config.endpoint, config.port))
    what = "confirmation port" if confirm else "port"
    if exc.errno == zmq.EADDRINUSE:
        return f"cannot bind {endpoint}: {what} {port} is in use by another program"
    if exc.errno in (zmq.EINVAL, zmq.ENODEV, zmq.EADDRNOTAVAIL):
        return f"cannot bind {endpoint}: bad address {config.bind!r} ({exc.strerror})"
    return f"cannot bind {endpoint}: {exc.strerror}"


class ProcessorThread(threading.Thread):
    """Takes batches off the queue, does the simulated work, accounts each sender run.

    It also owns the confirmation socket: a PUB that tells --confirm senders which
    of their tasks were processed (incrementally, as task ranges).
    """

    def __init__(self, ctx, config, batches, counters, stops, log, spill_path, server_keys=None):
        super().__init__(name="processor", daemon=True)
        self.ctx = ctx
        self.server_keys = server_keys
        self.config = config
        self.batches = batches
        self.counters = counters
        self.stops = stops
        self.log = log
        self.warnings = logs.RateLimitedLog(log, WARNING_INTERVAL)
        self.spill_path = spill_path
        self.ready = threading.Event()
        self.startup_error = None
        self.runs = {}  # run id -> RunState
        self.leftover = []  # messages taken off the queue but not processed (cold stop)
        self.server = f"Server:{config.port}"
        self._to_confirm = {}  # run id -> RunState with tasks processed, not yet published
        self._next_publish = 0.0
        self._next_expiry_check = 0.0

    def run(self):
        """Thread body: any unexpected error is logged with its traceback."""
        try:
            self._serve()
        except Exception:
            self.log.exception("[ERROR] processor thread failed")
        finally:
            self.ready.set()

    def _serve(self):
        confirms = self.ctx.socket(zmq.PUB)
        try:
            secure(confirms, self.config, self.server_keys)
            try:
                confirms.bind(self.config.confirm_endpoint)
            except zmq.ZMQError as exc:
                self.startup_error = bind_error_text(self.config, exc, confirm=True)
                return
            self.ready.set()
            self._process_loop(confirms)
            self._publish(confirms)
        finally:
            # A moment for the last confirmations to leave; senders resend what they miss.
            confirms.close(linger=int(CONFIRM_INTERVAL * 1000) * 4)

    def _process_loop(self, confirms):
        while not self.stops.cold.is_set():
            try:
                batch = self.batches.get(timeout=POLL_INTERVAL / 1000)
            except queue.Empty:
                self._publish(confirms)
                if self.stops.receive_done.is_set() and self.batches.empty():
                    break  # warm stop: everything received has been processed
                self._report_silent_runs()
                continue
            self._process_batch(batch, confirms)
            if time.monotonic() >= self._next_expiry_check:
                self._report_silent_runs()

    def _process_batch(self, batch, confirms):
        cold = self.stops.cold
        work = self.config.processing_time
        # With simulated work, each [PROC] line is logged when its work is done;
        # without, the batch's lines go out together at its end.
        lines = None if self.config.quiet else logs.LineBlock()
        counters = self.counters
        now = time.monotonic()
        last_info = run = None
        for index, msg in enumerate(batch.items):
            _, info, kind, worker, seq, sent_ns, resent, text, _ = msg
            if info is not last_info:
                if run is not None:
                    run.record_latencies()
                last_info = info
                run = None if info is None else self._run_state(info)
                if run is not None:
                    run.unrecorded_received_ns = batch.recv_ns
            if run is not None:
                run.last_seen = now
                if run.closed and kind != END and not resent:
                    self.warnings.warning("late", f"[RUN] run {wire.run_label(info.run_id)}:"
                                                  " a message arrived after the run was reported")
                if kind == END:
                    run.ends[worker] = seq
                    self._close_if_finished(run)
                    continue
                if not run.record(worker, seq):
                    self._duplicate(run, msg)
                    continue
            if work:
                if cold.wait(work):
                    if run is not None:
                        run.forget(worker, seq)  # it goes to the spill file instead
                    self.leftover = batch.items[index:]
                    break
                now = time.monotonic()
            counters.processed += 1
            if lines is not None:
                lines.append(logs.proc_line(self.server, wire.client_name(msg), seq, text))
                if work:
                    self.log.info(lines)
                    lines = logs.LineBlock()
            if run is None:
                counters.plain += 1
            else:
                run.unrecorded.append(sent_ns)
                if resent:
                    run.resent += 1
                if info.confirm:
                    run.to_confirm.append((worker, seq))
                    self._to_confirm[info.run_id] = run
                    if work:
                        self._publish_if_due(confirms)
                if run.received >= run.planned and not run.closed:
                    self._close(run, "complete")
        if run is not None:
            run.record_latencies()
        if lines:
            self.log.info(lines)
        self._publish_if_due(confirms)
        if batch.recovered and not self.leftover:
            self._remove_spill_file()

    def _run_state(self, info):
        run = self.runs.get(info.run_id)
        if run is None:
            run = self.runs[info.run_id] = RunState(info, time.monotonic())
        return run

    def _duplicate(self, run, msg):
        """A task processed before in this receiver's lifetime: dropped, not worked again."""
        self.counters.duplicates += 1
        worker, seq = msg[WORKER], msg[SEQ]
        if run.info.confirm:
            # Its confirmation may have been lost: confirm it again.
            run.to_confirm.append((worker, seq))
            self._to_confirm[run.info.run_id] = run
        self.warnings.warning("dup", f"[DUP] run {wire.run_label(run.info.run_id)}"
                                     f" {wire.client_name(msg)} task {seq} arrived again;"
                                     " dropped")

    def _publish_if_due(self, confirms):
        if self._to_confirm and time.monotonic() >= self._next_publish:
            self._publish(confirms)

    def _publish(self, confirms):
        """Send what was processed since the last publication, one frame pair per run."""
        self._next_publish = time.monotonic() + CONFIRM_INTERVAL
        if not self._to_confirm:
            return
        for run_id, run in self._to_confirm.items():
            per_worker = {}
            for worker, task in run.to_confirm:
                per_worker.setdefault(worker, []).append(task)
            run.to_confirm = []
            try:
                confirms.send_multipart(confirm.encode_confirmations(run_id, per_worker),
                                        zmq.NOBLOCK)
            except zmq.Again:
                pass  # PUB never blocks; a sender that misses this resends, and is re-confirmed
        self._to_confirm = {}

    def _close_if_finished(self, run):
        if not run.closed and run.finished:
            self._close(run, "complete" if run.received >= run.planned else "sender finished")

    def _close(self, run, reason):
        run.record_latencies()  # the [RUN] line shows them
        run.closed = True
        run.reports += 1
        level = self.log.info if run.received >= run.planned or run.info.endpoints > 1 \
            else self.log.warning
        level(run_line(run, reason))

    def _report_silent_runs(self):
        now = time.monotonic()
        self._next_expiry_check = now + 1.0
        if self.counters.backlog:
            return  # a backlog is not a silent sender
        for run in self.runs.values():
            if not run.closed and now - run.last_seen >= self.config.run_timeout:
                self._close(run, f"sender silent for {self.config.run_timeout:g} s")

    def report_open_runs(self):
        """At shutdown: a [RUN] line for every run not yet reported."""
        for run in self.runs.values():
            if not run.closed:
                self._close(run, "still open at shutdown")

    def _remove_spill_file(self):
        try:
            os.remove(self.spill_path)
            self.log.info(f"[SPILL] recovered messages processed; removed {self.spill_path}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning(f"[SPILL] could not remove {self.spill_path}: {exc.strerror}")


# ---------------------------------------------------------------------------
# Summary and main
# ---------------------------------------------------------------------------
class StopKind(enum.Enum):
    """How the receiver stopped."""

    WARM = "warm"  # backlog processed
    COLD = "cold"  # backlog written to the spill file
    FAILED = "failed"  # a thread died


def summary_data(counters, processor, queued, started, stop_kind):
    """The final summary, as the JSON written by --json."""
    duration = time.monotonic() - started
    return {
        "received": counters.received + counters.recovered,
        "recovered": counters.recovered,
        "processed": counters.processed,
        "duplicates": counters.duplicates,
        "invalid": counters.invalid,
        "spilled": counters.spilled,
        "unprocessed": queued,
        "plain": counters.plain,
        "rejected": counters.rejected,
        "rejected_connections": counters.rejected_connections,
        "duration_s": round(duration, 3),
        "processed_per_s": round(cli.rate(counters.processed, duration), 1),
        "stop": stop_kind.value,
        "runs": [run.to_json() for run in processor.runs.values()],
    }


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
        ("rate", f"{data['processed_per_s']:.1f} msg/s processed"),
        ("stop", data["stop"]),
    ]
    if data["unprocessed"]:
        rows.append(("LOST", f"{data['unprocessed']} received but neither processed nor spilled"))
    for run in data["runs"]:
        lat = run["latency_ms"]
        missing = "n/a (several receivers)" if run["missing"] is None else run["missing"]
        rows.append((f"run {run['run_id']}",
                     f"{run['received']}/{run['planned']} received, missing {missing},"
                     f" duplicates {run['duplicates']}, p50 {lat['p50']:.2f} ms,"
                     f" p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms"))
    return cli.format_table("Receiver summary", rows)


def stats_line(counters, last, elapsed):
    """One [STATS] line; `last` holds the counts of the previous line."""
    received_rate = cli.rate(counters.received - last[0], elapsed)
    processed_rate = cli.rate(counters.processed - last[1], elapsed)
    return (f"[STATS] received {counters.received} ({received_rate:.1f}/s) | processed"
            f" {counters.processed} ({processed_rate:.1f}/s) | queue {counters.backlog}"
            f" | invalid {counters.invalid} | connections {counters.peers}")


def wait_for_stop(signals, counters, config, log, threads):
    """Block until Ctrl+C/SIGTERM (returns None) or one of `threads` dies (returns it),
    printing [STATS] while busy."""
    last = (counters.received, counters.processed)
    last_time = time.monotonic()
    while not signals.first.wait(POLL_INTERVAL / 1000):
        for thread in threads:
            if not thread.is_alive():
                return thread
        now = time.monotonic()
        if now - last_time >= config.stats_interval:
            current = (counters.received, counters.processed)
            if current != last or counters.backlog:
                log.info(stats_line(counters, last, now - last_time))
            last, last_time = current, now
    return None


def finish_backlog(signals, stops, counters, receiver, processor, log):
    """Warm stop: stop receiving, then let the processor work the backlog for real.

    Every wait here can be cut short: a second signal turns the stop cold.
    """
    stops.warm.set()
    wait_for_thread(receiver, signals, stops, log)
    if processor.is_alive():
        log.info(f"[STOP] stopping: no new messages; processing the {counters.backlog} waiting"
                 " (Ctrl+C again to stop at once and save them to the spill file)")
    next_progress = time.monotonic() + 1.0
    while processor.is_alive():
        wait_for_thread(processor, signals, stops, log, POLL_INTERVAL / 1000)
        if time.monotonic() >= next_progress and processor.is_alive():
            log.info(f"[STOP] backlog: {counters.backlog} messages left to process")
            next_progress += 1.0


def wait_for_thread(thread, signals, stops, log, timeout=None):
    """Join `thread` (at most `timeout` seconds); a second signal meanwhile makes the stop cold."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
        thread.join(POLL_INTERVAL / 1000)
        if signals.second.is_set() and not stops.cold.is_set():
            stops.cold.set()
            log.warning("[STOP] second signal: stopping at once")


class Gatekeeper(ThreadAuthenticator):
    """pyzmq's ZAP authenticator thread, logging each refused peer once as [AUTH]."""

    def __init__(self, ctx, log):
        super().__init__(ctx)
        self.app_log = log
        self._address = "?"
        self._refused = set()

    async def handle_zap_message(self, msg):
        """Remember the peer's address for the reply, then authenticate as pyzmq does."""
        if len(msg) >= 6:
            self._address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous"):
        if status_code != b"200":
            peer = (self._address, status_text)
            if peer not in self._refused:
                self._refused.add(peer)
                self.app_log.warning(f"[AUTH] refused peer {self._address}:"
                                     f" {status_text.decode('utf-8', 'replace')}")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def start_gatekeeper(ctx, config, log):
    """Start ZAP authentication: open to all unless CURVE or an IP allow list is on."""
    gatekeeper = Gatekeeper(ctx, log)
    gatekeeper.start()
    if config.allow_ips:
        gatekeeper.allow(*config.allow_ips)
    if config.curve_server_key:
        location = config.curve_allow or zmq.auth.CURVE_ALLOW_ANY
        gatekeeper.configure_curve(domain=ZAP_DOMAIN, location=location)
    return gatekeeper


def security_warnings(config, log):
    """Say plainly when the receiver is open to anyone who can reach it."""
    if config.bind in ("*", "0.0.0.0", "::") and not config.curve_server_key:
        log.warning(f"[AUTH] bound to every interface without CURVE: anyone who can reach"
                    f" port {config.port} can send (see README, Running across machines)")
    elif config.curve_server_key and not config.curve_allow:
        log.warning("[AUTH] CURVE on without --curve-allow: traffic is encrypted, but any"
                    " client key is accepted")


def main(argv=None):
    """Run the receiver until Ctrl+C or SIGTERM; returns the exit status."""
    return cli.run_script("async-socket-receiver", parse_args(argv), serve,
                               EXIT_STARTUP_FAILED)


def serve(config, signals, log):
    """Start both threads, wait for a stop, shut down in order, report."""
    counters = Counters()
    try:
        recovered = recover(load_spill(config.spill_file), counters)
    except SpillError as exc:
        log.error(f"[ERROR] {exc}")
        return EXIT_STARTUP_FAILED
    try:
        server_keys = (security.load_secret_certificate(config.curve_server_key)
                       if config.curve_server_key else None)
        if config.curve_allow and not os.path.isdir(config.curve_allow):
            raise security.KeyFileError(f"--curve-allow {config.curve_allow} is not a directory")
    except security.KeyFileError as exc:
        log.error(f"[ERROR] {exc}")
        return EXIT_STARTUP_FAILED
    security_warnings(config, log)
    started = time.monotonic()
    stops = StopEvents()
    batches = BatchQueue(config.queue_size)
    ctx = zmq.Context()
    gatekeeper = None
    try:
        gatekeeper = start_gatekeeper(ctx, config, log)
        receiver = ReceiveThread(ctx, config, batches, counters, stops, log, server_keys)
        processor = ProcessorThread(ctx, config, batches, counters, stops, log,
                                    config.spill_file, server_keys)
        receiver.start()
        receiver.ready.wait()
        if receiver.startup_error or not receiver.is_alive():
            log.error(f"[ERROR] {receiver.startup_error or 'receive thread failed to start'}")
            receiver.join()
            return EXIT_STARTUP_FAILED
        if recovered:
            batches.put_past_bound(Batch(None, recovered, recovered=True))
            log.info(f"[SPILL] {counters.recovered} messages recovered from"
                     f" {config.spill_file}; processing them first")
        processor.start()
        processor.ready.wait()
        if processor.startup_error or not processor.is_alive():
            log.error(f"[ERROR] {processor.startup_error or 'processor failed to start'}")
            stops.cold.set()
            receiver.join()
            processor.join()
            return EXIT_STARTUP_FAILED
        log.info(f"[START] PULL socket bound to {config.endpoint} | processing time"
                 f" {config.processing_time:g} s | queue {config.queue_size} messages"
                 f"{' | log file ' + config.log_file if config.log_file else ''}")
        log.info("Server is running. Press Ctrl+C to stop.")
        dead = wait_for_stop(signals, counters, config, log, (receiver, processor))
        if dead is receiver:
            log.error("[ERROR] the receive thread stopped; processing what was received")
        elif dead is processor:
            log.error("[ERROR] the processor thread stopped; what was received goes to the"
                      " spill file")
        finish_backlog(signals, stops, counters, receiver, processor, log)
        unprocessed = processor.leftover + batches.take_all()
        if unprocessed:
            spill(unprocessed, config.spill_file, counters, log, processor.runs)
        processor.report_open_runs()
        stop_kind = (StopKind.FAILED if dead is not None
                     else StopKind.COLD if stops.cold.is_set() else StopKind.WARM)
    finally:
        stops.cold.set()  # after an unexpected error: threads let go of their sockets
        if gatekeeper is not None:
            gatekeeper.stop()
        ctx.term()
    lost = (counters.received + counters.recovered - counters.processed - counters.duplicates
            - counters.spilled)
    data = summary_data(counters, processor, lost, started, stop_kind)
    log.info("\n" + summary_table(data))
    if config.json_path:
        cli.write_json(config.json_path, data)
    return EXIT_OK if stop_kind is not StopKind.FAILED and not lost else EXIT_FAILED


def recover(frames, counters):
    """Decode the frames of a spill file; they are processed ahead of anything new."""
    items, run_cache = [], {}
    for frame in frames:
        try:
            items.append(wire.decode(frame, run_cache))
        except wire.InvalidMessage:
            counters.invalid += 1
    counters.recovered = count_data(items)
    return items


def count_data(messages):
    """How many of the decoded messages carry a task (END frames do not)."""
    return sum(1 for msg in messages if msg[KIND] == DATA)


def spill(messages, path, counters, log, runs):
    """Cold stop: save what was received but not processed, and say how many."""
    for msg in messages:
        run = msg[RUN]
        if run is not None and msg[KIND] == DATA and run.run_id in runs:
            runs[run.run_id].spilled += 1
    try:
        write_spill(path, [msg[RAW] for msg in messages])
    except OSError as exc:
        log.error(f"[SPILL] could not write {path}: {exc.strerror}; messages LOST")
        return
    counters.spilled = count_data(messages)
    log.warning(f"[SPILL] {counters.spilled} received but unprocessed messages saved to {path};"
                " the next start processes them first")


if __name__ == "__main__":
    sys.exit(main())
