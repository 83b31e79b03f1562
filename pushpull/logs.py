"""The log format and queue-based logging both scripts share.

Fixed column widths keep every "|" at the same offset for any run a user can
configure: up to 99999 workers, a million tasks and ten million messages.
"""

import logging
import logging.handlers
import queue
import sys
import time

from pushpull.wire import END, KIND, TASK, TEXT, client_name

COUNTER_WIDTH = 7  # digits of [MSG #nnnnnnn]
CLIENT_WIDTH = 12  # "Pusher-99999"
TASK_WIDTH = 6  # task numbers up to 999999
LOG_FORMAT = "%(asctime)s - %(levelname)-7s - %(message)s"
TEXT_SHOWN = 8192  # characters of a network text a log line shows at most
LINE_WIDTH = 160  # columns a status line fits in, its time and level prefix included
MESSAGE_WIDTH = LINE_WIDTH - len("2025-10-06 13:08:22.15 - WARNING - ")
CONTINUED = "    "  # a continuation line's start: it belongs to the tagged line above


def shown(text):
    """Text from the network made safe for a log line: control characters escaped
    (\\n, \\x1b, \\u2028 ...), so it can neither end the line nor drive a terminal,
    and at most TEXT_SHOWN characters."""
    # Ordinary text costs one isprintable() call (C, about 0.1 µs for a [MSG] text).
    if text.isprintable() and len(text) <= TEXT_SHOWN:
        return text
    cut = text[:TEXT_SHOWN]
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in cut)
    more = len(text) - len(cut)
    return escaped + (f" ... (+{more} characters)" if more else "")


def msg_line(counter, client, target, task, text):
    """The seed's [MSG] line, columns fixed; client and text as shown()."""
    return (f"[MSG #{counter:0{COUNTER_WIDTH}d}] ZMQ [{shown(client):<{CLIENT_WIDTH}}] ->"
            f" [{target}] | Task {task_cell(task)} | {shown(text)}")


def msg_lines(messages, number, target):
    """The [MSG] lines of a batch of decoded messages, numbered from `number`, as one
    LineBlock (END frames are bookkeeping: no line, no number)."""
    lines = LineBlock()
    for msg in messages:
        if msg[KIND] != END:
            lines.append(msg_line(number, client_name(msg), target, msg[TASK], msg[TEXT]))
            number += 1
    return lines


def proc_line(server, client, task, text):
    """The seed's [PROC] line, columns fixed; client and text as shown()."""
    return (f"[PROC] {server} | {shown(client):<{CLIENT_WIDTH}} | Task {task_cell(task)}"
            f" | Processing: {shown(text)}")


def task_cell(task):
    """A task number right-aligned in its column, or '-' when the message has none."""
    return f"{task:>{TASK_WIDTH}}" if task >= 0 else f"{'-':>{TASK_WIDTH}}"


class LineBlock(list):
    """Per-message log lines logged as one record: one record per batch, not per line.

    The formatter gives every line the usual prefix, so the output is the same as
    one record per line, at a fraction of the logging module's per-record cost.
    """

    def __str__(self):
        return "\n".join(self)


def continued(head, parts, lead="", sep=" | "):
    """A LineBlock: `head`, then `parts` on continuation lines (CONTINUED, then `lead`
    on the first), joined by `sep`, each line within MESSAGE_WIDTH where a part allows."""
    block, line = LineBlock([head]), CONTINUED + lead
    fresh = True  # nothing on `line` yet but its start
    for part in parts:
        if not fresh and len(line) + len(sep) + len(part) > MESSAGE_WIDTH:
            block.append(line + sep.rstrip())
            line, fresh = CONTINUED + " " * len(lead), True
        line += part if fresh else sep + part
        fresh = False
    if not fresh:
        block.append(line)
    return block


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

    def __init__(self, records, *handlers):
        super().__init__(records, *handlers)
        self.failures = []  # the [ERROR] line of each log file dropped (drop())

    def start(self):
        """Start the listener thread, named "log": a thread dump (py-spy) says which it is."""
        super().start()
        self._thread.name = "log"

    def dequeue(self, block):
        """Next record; flush every handler first when none is waiting."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            for handler in self.handlers:
                handler.flush()
            return self.queue.get(block)

    def drop(self, handler, line):
        """A handler failed (a log file on a full disk): stop writing to it, and log the
        [ERROR] `line` once to the handlers left (the console goes on)."""
        self.handlers = tuple(h for h in self.handlers if h is not handler)
        self.failures.append(line)
        record = logging.LogRecord("logs", logging.ERROR, "", 0, line, None, None)
        for other in self.handlers:
            other.handle(record)
            other.flush()


class UnflushedHandler(logging.StreamHandler):
    """StreamHandler.emit without its flush per record; BatchingListener flushes."""

    def emit(self, record):
        """Write one formatted record."""
        try:
            self.stream.write(self.format(record) + self.terminator)
        except (OSError, ValueError):  # a closed or full stream, an unencodable character
            self.handleError(record)


class UnflushedFileHandler(UnflushedHandler, logging.FileHandler):
    """FileHandler with UnflushedHandler's emit. A write that fails (a full disk) is
    reported once through `failed(line)` (BatchingListener.drop), and the file is no
    longer written: never a traceback, never the logging thread's end."""

    failed = None  # failed(line): set by start_logging

    def emit(self, record):
        """Write one formatted record; on an OSError, give the file up."""
        try:
            self.stream.write(self.format(record) + self.terminator)
        except OSError as exc:
            self.give_up(exc)
        except ValueError:  # an unencodable character
            self.handleError(record)

    def flush(self):
        """Flush the buffered records; on an OSError, give the file up."""
        try:
            super().flush()
        except OSError as exc:
            self.give_up(exc)

    def give_up(self, exc):
        """Close the file (what it could not take is lost) and say so once."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            stream.close()
        except OSError:
            pass  # the same error again, as close() flushes: already reported
        reason = (exc.strerror or str(exc)).lower()
        line = (f"[ERROR] log file {self.baseFilename}: {reason}; it is no longer written"
                " (the console goes on)")
        if self.failed is not None:
            self.failed(self, line)


class LogSetupError(OSError):
    """The log file cannot be opened."""


def start_logging(name, log_file, console=None):
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
    console_handler = UnflushedHandler(sys.stdout if console is None else console)
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
    if log_file:
        file_handler.failed = listener.drop
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


class BlockLog:
    """Per-message lines logged in blocks of up to `size` lines, one record per block.

    One logging record per line cost more than sending the message; in blocks,
    a pair logging every message runs at about 150k msg/s (bench figure (3),
    bench/README.md).
    """

    def __init__(self, log, size):
        self._log = log
        self._size = size
        self._lines = LineBlock()

    def add(self, line):
        """Add a line; log the block once it is full."""
        self._lines.append(line)
        if len(self._lines) >= self._size:
            self.flush()

    def flush(self):
        """Log the lines not logged yet."""
        if self._lines:
            self._log.info(self._lines)
            self._lines = LineBlock()
