"""Code both scripts share: the wire format, the log format, latency stats, summaries.

Kept to the standard library and pyzmq, so each script still runs from a plain
checkout with only requirements.txt installed.
"""

import enum
import json
import logging
import logging.handlers
import os
import queue
import re
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------
# One ZeroMQ frame per message:  HEADER (40 bytes) + UTF-8 text + padding.
# The first byte 0xFF can never start valid UTF-8 text, so a frame from any
# other PUSH client (plain text) is never mistaken for one of ours.
# The header's first 20 bytes are the same in every frame of a run, so the
# receiver looks the run up by those bytes instead of parsing them each time.
WIRE_MAGIC = b"\xff\x01"  # 0xFF, then format version 1
RUN_FIELDS = struct.Struct("!2sBBIIQ")
# magic, run flags, endpoints, workers, messages per worker, run id
MESSAGE_FIELDS = struct.Struct("!BBIIqH")
# kind, message flags, worker, task, sent time (ns since the epoch), text length
HEADER = struct.Struct("!2sBBIIQBBIIqH")  # RUN_FIELDS then MESSAGE_FIELDS
MESSAGE_TAIL = struct.Struct("!IqH")  # task, sent time, text length: what a worker varies
HEADER_SIZE = HEADER.size
RUN_KEY_SIZE = RUN_FIELDS.size
RESENT_OFFSET = RUN_KEY_SIZE + 1  # byte offset of the message flags
FLAG_CONFIRM = 0x01  # run flag: the sender wants confirmations (--confirm)
FLAG_RESENT = 0x01  # message flag: a resend of a task that was not confirmed in time

# Confirmations (receiver PUB -> sender SUB): topic = run id (8 bytes), then
# (worker, first task, count) triples for tasks processed since the last one.
CONFIRM_TOPIC = struct.Struct("!Q")
CONFIRM_RANGE = struct.Struct("!III")
MESSAGE_TEXT = "Pusher-{worker}[PID:{pid}/TID:{tid}] - Task {task}"
RUN_CACHE_SIZE = 1024  # runs remembered by decode() before the cache starts over
# ASCII digits, at most nine: int() of "Task" followed by thousands of digits raises.
PLAIN_TEXT_PATTERN = re.compile(r"^(?P<client>[^\[\s]{1,40})\[.*\] - Task (?P<task>[0-9]{1,9})$")


class MessageKind(enum.IntEnum):
    """What a wire-format frame carries."""

    DATA = 0  # one task
    END = 1  # a worker's last frame: seq holds how many tasks it sent


# The same as plain ints, for the per-message paths: an int compares faster than
# an enum member is looked up.
DATA, END = int(MessageKind.DATA), int(MessageKind.END)


class InvalidMessage(ValueError):
    """A frame that is neither in the wire format nor readable as plain text."""


@dataclass(frozen=True)
class RunInfo:
    """What every frame of one sender run says about the run."""

    run_id: int
    workers: int
    messages_per_worker: int
    endpoints: int
    confirm: bool = False

    @property
    def planned(self):
        """Messages this run plans to send in all."""
        return self.workers * self.messages_per_worker


def run_label(run_id):
    """The short form of a run id used in logs."""
    return f"{run_id & 0xFFFFFFFF:08x}"


class MessageEncoder:
    """Builds the frames of one sender worker; what never changes is computed once."""

    def __init__(self, run, worker, pid, tid, pad_to=0):
        self.run = run
        self.worker = worker
        self.pad_to = pad_to
        flags = FLAG_CONFIRM if run.confirm else 0
        self.text_prefix = MESSAGE_TEXT.format(worker=worker, pid=pid, tid=tid, task="")
        self._text_prefix = self.text_prefix.encode()
        run_bytes = RUN_FIELDS.pack(WIRE_MAGIC, flags, run.endpoints, run.workers,
                                    run.messages_per_worker, run.run_id)
        self._data_prefix = run_bytes + bytes([MessageKind.DATA, 0]) + worker.to_bytes(4, "big")
        self._end_prefix = run_bytes + bytes([MessageKind.END, 0]) + worker.to_bytes(4, "big")

    def text(self, task):
        """The human-readable text of task number `task`."""
        return f"{self.text_prefix}{task}"

    def data(self, task):
        """A DATA frame for `task`, stamped with the current time."""
        digits = b"%d" % task
        text_size = len(self._text_prefix) + len(digits)
        frame = b"".join((self._data_prefix, MESSAGE_TAIL.pack(task, time.time_ns(), text_size),
                          self._text_prefix, digits))
        if len(frame) < self.pad_to:
            frame += b" " * (self.pad_to - len(frame))
        return frame

    def end(self, sent):
        """The END frame a worker sends last, saying how many tasks it sent."""
        return self._end_prefix + MESSAGE_TAIL.pack(sent, time.time_ns(), 0)


def mark_resent(frame):
    """The same frame with FLAG_RESENT set, so the receiver can count resends."""
    return b"%b%c%b" % (frame[:RESENT_OFFSET], frame[RESENT_OFFSET] | FLAG_RESENT,
                        frame[RESENT_OFFSET + 1:])


# A decoded message is a plain tuple, the cheapest object Python builds (the receiver
# builds one per message, hundreds of thousands a second; a dataclass cost 0.2 µs more):
#     (raw, run, kind, worker, seq, sent_ns, resent, text, client)
# run is the frame's RunInfo, or None for plain text from another client, whose
# name is then in client ("" for frames in the wire format: see client_name).
RAW, RUN, KIND, WORKER, SEQ, SENT_NS, RESENT, TEXT, CLIENT = range(9)  # field positions


def client_name(msg):
    """Who sent a decoded message: Pusher-N, or the name read from a plain message."""
    return msg[CLIENT] or f"Pusher-{msg[WORKER]}"


def decode(frame, run_cache):
    """Decode one frame into a message tuple (see above); raise InvalidMessage for bad input.

    run_cache maps the header's run bytes to a shared RunInfo, so a run costs one
    object and one parse, not one per message.
    """
    run = run_cache.get(frame[:RUN_KEY_SIZE])
    if run is None:
        if not frame:
            raise InvalidMessage("empty message")
        if frame[0] != 0xFF:
            return decode_plain(frame)
        run = new_run(frame, run_cache)
    if len(frame) < HEADER_SIZE:
        raise InvalidMessage(f"truncated header ({len(frame)} bytes)")
    kind, flags, worker, seq, sent_ns, text_len = MESSAGE_FIELDS.unpack_from(frame, RUN_KEY_SIZE)
    if kind > END or HEADER_SIZE + text_len > len(frame):
        raise InvalidMessage("bad header")
    if not 1 <= worker <= run.workers or (kind == DATA and seq >= run.messages_per_worker):
        raise InvalidMessage(f"worker {worker} or task {seq} outside its run")
    try:
        text = frame[HEADER_SIZE:HEADER_SIZE + text_len].decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"text is not UTF-8 ({exc.reason})") from None
    return frame, run, kind, worker, seq, sent_ns, bool(flags & FLAG_RESENT), text, ""


def new_run(frame, run_cache):
    """Parse and remember the run fields of the first frame seen from a run."""
    if len(frame) < HEADER_SIZE:
        raise InvalidMessage(f"truncated header ({len(frame)} bytes)")
    magic, flags, endpoints, workers, per_worker, run_id = RUN_FIELDS.unpack_from(frame)
    if magic != WIRE_MAGIC or not workers:
        raise InvalidMessage("bad header")
    run = RunInfo(run_id, workers, per_worker, endpoints, bool(flags & FLAG_CONFIRM))
    if len(run_cache) >= RUN_CACHE_SIZE:
        run_cache.clear()  # bounded: garbage with random run ids must not grow it forever
    run_cache[frame[:RUN_KEY_SIZE]] = run
    return run


def decode_plain(frame):
    """A single-frame text message from another PUSH client."""
    try:
        text = frame.decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.isprintable():
        raise InvalidMessage("text has control characters")
    match = PLAIN_TEXT_PATTERN.match(text)
    if match:
        return frame, None, DATA, 0, int(match["task"]), 0, False, text, match["client"]
    return frame, None, DATA, 0, -1, 0, False, text, "plain"


def task_ranges(tasks):
    """Sorted (first, count) runs covering the task numbers in `tasks`."""
    ranges = []
    for task in sorted(tasks):
        if ranges and ranges[-1][0] + ranges[-1][1] == task:
            ranges[-1][1] += 1
        elif not ranges or ranges[-1][0] + ranges[-1][1] < task:
            ranges.append([task, 1])
    return ranges


def encode_confirmations(run_id, per_worker):
    """One confirmation frame pair: [topic, ranges] for {worker: tasks processed}."""
    body = b"".join(CONFIRM_RANGE.pack(worker, first, count)
                    for worker, tasks in per_worker.items()
                    for first, count in task_ranges(tasks))
    return [CONFIRM_TOPIC.pack(run_id), body]


def decode_confirmations(body):
    """(worker, first task, count) triples from a confirmation body."""
    usable = len(body) - len(body) % CONFIRM_RANGE.size
    return [CONFIRM_RANGE.unpack_from(body, offset)
            for offset in range(0, usable, CONFIRM_RANGE.size)]


def confirm_endpoint(endpoint):
    """Where a receiver's confirmations come from: the same host, data port + 1."""
    match = re.match(r"^tcp://(.+):(\d+)$", endpoint)
    if not match:
        raise ValueError(f"--confirm needs tcp://HOST:PORT endpoints, not {endpoint}")
    return f"tcp://{match[1]}:{int(match[2]) + 1}"


# ---------------------------------------------------------------------------
# Log format
# ---------------------------------------------------------------------------
# Fixed column widths keep every "|" at the same offset for any run a user can
# configure: up to 99999 workers, a million tasks and ten million messages.
COUNTER_WIDTH = 7  # digits of [MSG #nnnnnnn]
CLIENT_WIDTH = 12  # "Pusher-99999"
TASK_WIDTH = 6  # task numbers up to 999999
LOG_FORMAT = "%(asctime)s - %(levelname)-7s - %(message)s"


def msg_line(counter, client, target, task, text):
    """The seed's [MSG] line, columns fixed."""
    return (f"[MSG #{counter:0{COUNTER_WIDTH}d}] ZMQ [{client:<{CLIENT_WIDTH}}] -> [{target}]"
            f" | Task {task_cell(task)} | {text}")


def proc_line(server, client, task, text):
    """The seed's [PROC] line, columns fixed."""
    return (f"[PROC] {server} | {client:<{CLIENT_WIDTH}} | Task {task_cell(task)}"
            f" | Processing: {text}")


def task_cell(task):
    """A task number right-aligned in its column, or '-' when the message has none."""
    return f"{task:>{TASK_WIDTH}}" if task >= 0 else f"{'-':>{TASK_WIDTH}}"


class LineBlock(list):
    """Per-message log lines logged as one record: one record per batch, not per line.

    The formatter gives every line the usual prefix, so the output is the same as
    one record per line, at a fraction of the logging module's per-record cost.
    """


class CentisecondFormatter(logging.Formatter):
    """Timestamps with two decimals, as in the seed: 2025-10-06 13:08:22.15."""

    def __init__(self):
        super().__init__(LOG_FORMAT)
        self._second = None
        self._second_text = ""

    def format(self, record):
        """Format a record; a LineBlock becomes one prefixed line per entry."""
        if isinstance(record.msg, LineBlock):
            prefix = f"{self.formatTime(record)} - {record.levelname:<7} - "
            return "\n".join([prefix + line for line in record.msg])
        return super().format(record)

    def formatTime(self, record, datefmt=None):
        """Format the record's time, reusing the strftime of the current second."""
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._second_text}.{int(record.msecs) // 10:02d}"


class EnqueueOnlyHandler(logging.handlers.QueueHandler):
    """A QueueHandler that leaves all formatting to the listener thread."""

    def prepare(self, record):
        """Pass the record on untouched: messages here are already plain strings."""
        return record

    def handle(self, record):
        """Enqueue without the handler lock: the queue is thread-safe, and twenty
        workers queueing for that lock was most of a logging sender's time."""
        self.enqueue(record)
        return True


class BatchingListener(logging.handlers.QueueListener):
    """A QueueListener that flushes its handlers only when the queue runs empty.

    Handlers write without flushing (see UnflushedHandler), so a burst of records
    costs one write per buffer, not one per line; an idle log is still flushed
    at once.
    """

    def dequeue(self, block):
        """Next record; flush every handler first when none is waiting."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            for handler in self.handlers:
                handler.flush()
            return self.queue.get(block)


class UnflushedHandler(logging.StreamHandler):
    """StreamHandler.emit without its flush per record; BatchingListener flushes."""

    def emit(self, record):
        """Write one formatted record."""
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)


class UnflushedFileHandler(UnflushedHandler, logging.FileHandler):
    """FileHandler with UnflushedHandler's emit."""


class LogSetupError(OSError):
    """The log file cannot be opened."""


def start_logging(name, log_file, console=sys.stdout):
    """Log to the console and optionally a file, formatting and writing on a listener thread.

    The calling threads only enqueue records (QueueHandler), so per-message logging
    costs the hot loops one queue put. Returns (logger, listener); stop the
    listener last, it flushes what is left.
    """
    # Per-record bookkeeping nobody reads here; the logging HOWTO's own optimisations.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    formatter = CentisecondFormatter()
    handlers = []
    console_handler = UnflushedHandler(console)
    console_handler.setFormatter(formatter)
    handlers.append(console_handler)
    if log_file:
        try:
            file_handler = UnflushedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise LogSetupError(f"cannot open log file {log_file}: {exc.strerror}") from None
        file_handler.setFormatter(formatter)
        handlers.append(file_handler)
    records = queue.SimpleQueue()
    listener = BatchingListener(records, *handlers)
    logger = logging.getLogger(name)
    logger.handlers[:] = [EnqueueOnlyHandler(records)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    listener.start()
    return logger, listener


class RateLimitedLog:
    """Logs a kind of warning at most once per interval, counting what it held back."""

    def __init__(self, log, interval):
        self.log = log
        self.interval = interval
        self._last = {}
        self._held = {}

    def warning(self, key, message):
        """Log `message` unless one with this key was logged less than an interval ago."""
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        suffix = f" (+{held} more like this not shown)" if held else ""
        self._last[key] = now
        self.log.warning(message + suffix)


# ---------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------
class LatencyHistogram:
    """Log-linear histogram of microseconds: constant memory, about 1.5 % resolution."""

    SUB_BUCKETS = 64

    def __init__(self):
        self.counts = {}
        self.count = 0
        self.max_us = 0

    def add_batch(self, received_ns, sent_ns):
        """Record the latencies of messages received together at `received_ns`, one per
        send time in `sent_ns` (ns since the epoch); one call per batch, not per message."""
        received_us = received_ns // 1000
        counts = self.counts
        get = counts.get
        small = 2 * self.SUB_BUCKETS
        sub_buckets = self.SUB_BUCKETS
        top = self.max_us
        for sent in sent_ns:
            micros = received_us - sent // 1000
            if micros < small:
                # The clocks of two hosts can disagree: never report negative time.
                bucket = micros if micros > 0 else 0
            else:
                shift = micros.bit_length() - 7  # 2 ** 7 == small
                bucket = shift * sub_buckets + (micros >> shift)
            if micros > top:
                top = micros
            counts[bucket] = get(bucket, 0) + 1
        self.max_us = top
        self.count += len(sent_ns)

    def percentile(self, fraction):
        """The latency (µs) below which `fraction` of the samples lie."""
        if not self.count:
            return 0
        rank = max(1, int(fraction * self.count + 0.999999))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self._upper_bound(bucket), self.max_us)
        return self.max_us

    def _upper_bound(self, bucket):
        if bucket < 2 * self.SUB_BUCKETS:
            return bucket
        shift = bucket // self.SUB_BUCKETS - 1
        return ((bucket - shift * self.SUB_BUCKETS + 1) << shift) - 1

    def summary_ms(self):
        """p50, p99 and max in milliseconds, for the JSON summary."""
        return {
            "p50": round(self.percentile(0.50) / 1000, 3),
            "p99": round(self.percentile(0.99) / 1000, 3),
            "max": round(self.max_us / 1000, 3),
        }


# ---------------------------------------------------------------------------
# CURVE keys (pyzmq's certificate format, zmq.auth)
# ---------------------------------------------------------------------------
class KeyFileError(Exception):
    """A certificate file is missing, unreadable or of the wrong kind."""


def generate_keys(directory):
    """Write server and client certificates (public and secret) into `directory`."""
    import zmq.auth
    os.makedirs(directory, exist_ok=True)
    return [path for name in ("server", "client")
            for path in zmq.auth.create_certificates(directory, name)]


def load_secret_certificate(path):
    """(public, secret) keys from a *.key_secret file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path):
    """The public key from a certificate file (.key or .key_secret)."""
    return _load_certificate(path)[0]


def _load_certificate(path):
    import zmq.auth
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read certificate {path}: {exc}") from None


# ---------------------------------------------------------------------------
# Summaries, stop signals, small helpers
# ---------------------------------------------------------------------------
def format_table(title, rows):
    """An aligned two-column table: rows are (label, value) pairs."""
    width = max(len(label) for label, _ in rows)
    lines = [f"==== {title} ===="]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def write_json(path, data):
    """Write `data` to `path` as JSON, atomically, so no reader sees half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    os.replace(temporary, path)


def rate(count, seconds):
    """Messages per second, safe for a zero duration."""
    return count / seconds if seconds > 0 else 0.0


class StopSignals:
    """Counts Ctrl+C / SIGTERM: the first sets `first`, the second `second`, a third exits.

    With exit_on_second the second signal exits at once, even while the main
    thread is blocked in a flush.
    """

    def __init__(self, exit_on_second=False):
        self.first = threading.Event()
        self.second = threading.Event()
        self.exit_on_second = exit_on_second
        self.count = 0

    def install(self):
        """Handle SIGINT, and SIGTERM and Windows' SIGBREAK (Ctrl+Break) where they exist."""
        signal.signal(signal.SIGINT, self._handle)
        for name in ("SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.first.set()
        elif self.count == 2 and not self.exit_on_second:
            self.second.set()
        else:
            sys.stderr.write("interrupted again: exiting at once\n")
            os._exit(130)


def run_script(name, config, body, startup_failed, exit_on_second=False):
    """What both scripts' main() do around their work: keys, signals, logging.

    --generate-keys writes certificates and returns 0. Otherwise `body(config,
    signals, log)` runs with the log listener stopped (flushed) afterwards.
    """
    if config.generate_keys:
        for path in generate_keys(config.generate_keys):
            print(f"wrote {path}")
        return 0
    signals = StopSignals(exit_on_second)
    signals.install()
    try:
        log, listener = start_logging(name, config.log_file)
    except LogSetupError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return startup_failed
    try:
        return body(config, signals, log)
    finally:
        listener.stop()


def add_report_flags(parser, quiet, stats_interval, json_path):
    """The flags both scripts share: output, statistics, JSON summary, key generation.

    The defaults are the calling script's own constants, named in each help text.
    """
    parser.add_argument("--quiet", action="store_true", default=quiet,
                        help="no per-message lines, only stats and summary (QUIET)")
    parser.add_argument("--stats-interval", metavar="SECONDS", type=positive(float),
                        default=stats_interval,
                        help="seconds between [STATS] lines (STATS_INTERVAL)")
    parser.add_argument("--json", metavar="PATH", default=json_path,
                        help="on exit, write the summary as JSON to PATH (JSON_SUMMARY)")
    parser.add_argument("--generate-keys", metavar="DIR",
                        help="write server and client certificates into DIR, then exit")


def free_port():
    """A free TCP port on 127.0.0.1 whose successor (the confirmation port) is free too.

    For the demo, the tests and the benchmark, which run pairs side by side.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as confirm:
            try:
                confirm.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def positive(kind):
    """An argparse type: a number of `kind` (int or float) that is > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind):
    """An argparse type: a number of `kind` (int or float) that is >= 0."""
    def parse(text):
        value = kind(text)
        if value < 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse
