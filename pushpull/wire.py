"""The wire format: one ZeroMQ frame per message, its encoder and its decoder.

One frame per message:  HEADER (48 bytes) + UTF-8 text + padding (--format binary),
or the seed's text + a readable trailer (--format text, see TextEncoder).
The first byte 0xFF can never start valid UTF-8 text, so a frame from any
other PUSH client (plain text) is never mistaken for one of ours.
The header's first 20 bytes are the same in every frame of a run, so the
receiver looks the run up by those bytes instead of parsing them each time.
"""

import collections
import enum
import re
import struct
import time
from dataclasses import dataclass

import zmq

WIRE_MAGIC = b"\xff\x02"  # 0xFF, then format version 2 (2 added the intended send time)
RUN_FIELDS = struct.Struct("!2sBBIIQ")
# magic, run flags, endpoints, workers, messages per worker, run id
MESSAGE_FIELDS = struct.Struct("!BBIIqqH")
# kind, message flags, worker, task, intended and actual send times (ns since the epoch),
# text length
HEADER = struct.Struct("!2sBBIIQBBIIqqH")  # RUN_FIELDS then MESSAGE_FIELDS
COUNT_MAX = 2**32 - 1  # workers, messages per worker, tasks and an END's count are uint32
MESSAGE_TAIL = struct.Struct("!IqqH")  # task, intended, sent, text length: what a worker varies
HEADER_SIZE = HEADER.size
RUN_KEY_SIZE = RUN_FIELDS.size
RESENT_OFFSET = RUN_KEY_SIZE + 1  # byte offset of the message flags
SEND_TIME = struct.Struct("!q")
SEND_TIME_OFFSET = RUN_KEY_SIZE + struct.calcsize("!BBIIq")  # byte offset of the send time
FLAG_CONFIRM = 0x01  # run flag: the sender wants confirmations (--confirm)
FLAG_SCHEDULED = 0x02  # run flag: intended send times follow a schedule (--rate, --delay)
FLAG_RESENT = 0x01  # message flag: a resend of a task that was not confirmed in time
FLAG_WARMUP = 0x02  # message flag: sent in the --warmup seconds, kept out of latency figures
MESSAGE_TEXT = "Pusher-{worker}[PID:{pid}/TID:{tid}] - Task {task}"
RUNS_REMEMBERED = 65536  # runs whose first frame decode() remembers, to check the others by
# ASCII digits, at most nine: int() of "Task" followed by thousands of digits raises.
PLAIN_TEXT_PATTERN = re.compile(r"^(?P<client>[^\[\s]{1,40})\[.*\] - Task (?P<task>[0-9]{1,9})$")


class MessageKind(enum.IntEnum):
    """What a wire-format frame carries."""

    DATA = 0  # one task
    END = 1  # a worker's last frame: its task field holds how many tasks it sent


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
    scheduled: bool = False  # intended send times differ from actual ones: two histograms

    @property
    def planned(self):
        """Messages this run plans to send in all."""
        return self.workers * self.messages_per_worker


def run_label(run_id):
    """The short form of a run id used in logs."""
    return f"{run_id & 0xFFFFFFFF:08x}"


def run_header(run):
    """The run fields that open every frame of `run` (RUN_FIELDS), its flags byte included."""
    flags = (FLAG_CONFIRM if run.confirm else 0) | (FLAG_SCHEDULED if run.scheduled else 0)
    return RUN_FIELDS.pack(WIRE_MAGIC, flags, run.endpoints, run.workers,
                           run.messages_per_worker, run.run_id)


class MessageEncoder:
    """Builds the frames of one sender worker; what never changes is computed once."""

    def __init__(self, run, worker, pid, tid, pad_to=0):
        self.run = run
        self.worker = worker
        self.pad_to = pad_to
        self.text_prefix = MESSAGE_TEXT.format(worker=worker, pid=pid, tid=tid, task="")
        self._text_prefix = self.text_prefix.encode()
        self._text_size = len(self._text_prefix)
        run_bytes = run_header(run)
        number = worker.to_bytes(4, "big")
        self._data_prefix = run_bytes + bytes([MessageKind.DATA, 0]) + number
        self._warmup_prefix = run_bytes + bytes([MessageKind.DATA, FLAG_WARMUP]) + number
        self._end_prefix = run_bytes + bytes([MessageKind.END, 0]) + number
        # data()'s frame in one pack() per width of the task number (1 to 10 digits).
        self._packs = [struct.Struct(f"!{len(self._data_prefix)}s{MESSAGE_TAIL.format[1:]}"
                                     f"{self._text_size}s{width}s").pack
                       for width in range(11)]

    def text(self, task):
        """The human-readable text of task number `task`."""
        return f"{self.text_prefix}{task}"

    def data(self, task):
        """A DATA frame for `task` without a schedule: intended = actual = now."""
        # The flood's hot path: with one struct pack() for the whole frame, data() costs
        # 0.28 µs where a pack and a join cost 0.34 µs (bench/README.md, "Profiles",
        # issue 22).
        now = time.time_ns()
        digits = b"%d" % task
        width = len(digits)
        frame = self._packs[width](self._data_prefix, task, now, now, self._text_size + width,
                                   self._text_prefix, digits)
        if len(frame) < self.pad_to:
            frame += b" " * (self.pad_to - len(frame))
        return frame

    def data_at(self, task, intended_ns, warmup=False):
        """A DATA frame for `task`, meant to leave at `intended_ns`, stamped with now."""
        prefix = self._warmup_prefix if warmup else self._data_prefix
        return self._frame(prefix, task, intended_ns, time.time_ns())

    def _frame(self, prefix, task, intended_ns, sent_ns):
        digits = b"%d" % task
        text_size = self._text_size + len(digits)
        frame = b"".join((prefix, MESSAGE_TAIL.pack(task, intended_ns, sent_ns, text_size),
                          self._text_prefix, digits))
        if len(frame) < self.pad_to:
            frame += b" " * (self.pad_to - len(frame))
        return frame

    def end(self, sent):
        """The END frame a worker sends last, saying how many tasks it sent."""
        now = time.time_ns()
        return self._end_prefix + MESSAGE_TAIL.pack(sent, now, now, 0)


# --format text: the seed's message, then this trailer (docs/load-testing.md, "The text format").
TEXT_TRAILER = (" | pushpull run={run:016x} shape={workers}x{messages}x{endpoints}"
                " intended={intended} sent={sent}")
TEXT_WARMUP = " warmup"  # appended to the trailer of a message sent in the --warmup seconds
TEXT_PATTERN = re.compile(
    r"^(?P<text>Pusher-(?P<worker>[0-9]{1,9})\[[^\]]{0,80}\] - Task (?P<task>[0-9]{1,9}))"
    r" \| pushpull run=(?P<run>[0-9a-f]{16}) shape=(?P<workers>[0-9]{1,9})x"
    r"(?P<messages>[0-9]{1,9})x(?P<endpoints>[0-9]{1,3}) intended=(?P<intended>[0-9]{1,19})"
    r" sent=(?P<sent>[0-9]{1,19})(?P<warmup> warmup)? *$")
TEXT_MARK = " | pushpull run="  # a plain message with this is read as the text format


class TextEncoder(MessageEncoder):
    """Builds --format text frames: any text consumer reads them, ours accounts for them."""

    def __init__(self, run, worker, pid, tid, pad_to=0):
        super().__init__(run, worker, pid, tid, pad_to)
        self._shape = dict(run=run.run_id, workers=run.workers,
                           messages=run.messages_per_worker, endpoints=run.endpoints)

    def data(self, task):
        """A text frame for `task` without a schedule: intended = actual = now."""
        now = time.time_ns()
        return self._text_frame(task, now, now, False)

    def data_at(self, task, intended_ns, warmup=False):
        """A text frame for `task`, meant to leave at `intended_ns`, stamped with now."""
        return self._text_frame(task, intended_ns, time.time_ns(), warmup)

    def _text_frame(self, task, intended_ns, sent_ns, warmup):
        trailer = TEXT_TRAILER.format(intended=intended_ns, sent=sent_ns, **self._shape)
        frame = f"{self.text_prefix}{task}{trailer}{TEXT_WARMUP if warmup else ''}".encode()
        if len(frame) < self.pad_to:
            frame += b" " * (self.pad_to - len(frame))
        return frame

    def end(self, sent):
        """None: a text run sends no END frame, which a text consumer would count as a task."""
        return None


def mark_resent(frame):
    """The same frame with FLAG_RESENT set, so the receiver can count resends."""
    return b"%b%c%b" % (frame[:RESENT_OFFSET], frame[RESENT_OFFSET] | FLAG_RESENT,
                        frame[RESENT_OFFSET + 1:])


def restamp(frame):
    """The same frame with the current time as its send time: for a frame that waited."""
    return b"%b%b%b" % (frame[:SEND_TIME_OFFSET], SEND_TIME.pack(time.time_ns()),
                        frame[SEND_TIME_OFFSET + SEND_TIME.size:])


# A decoded message is a plain tuple; its fields by position:
#     raw      the frame as received (what a spill file saves)
#     run      the frame's RunInfo; None for plain text from another client
#     kind     DATA or END
#     worker   1 ... run.workers; 0 for plain text
#     task     DATA: the task number (-1 for plain text without one);
#              END: how many tasks the worker sent
#     sent_ns  actual send time, ns since the epoch (0 for plain text)
#     resent   True for a --confirm sender's resend
#     text     the message text (for --format text: without the trailer)
#     client   the name read from plain text; "" for frames in the wire format
#     intended_ns  intended send time, ns since the epoch (= sent_ns for a flood);
#              None for a message of the --warmup seconds and for plain text:
#              no latency recorded
# The receiver decodes one per message. A tuple subclass with named fields
# (namedtuple's accessors, tuple's own constructor) cost 0.13 µs more to build and
# 0.05 µs more to unpack: under the load of figure (2) (bench/README.md) the
# receiver's CPU per message rose by 10 %, and the pair's throughput fell by as
# much. The hot paths unpack the tuple into names instead.
RAW, RUN, KIND, WORKER, TASK, SENT_NS, RESENT, TEXT, CLIENT, INTENDED_NS = range(10)


def client_name(msg):
    """Who sent a decoded message: Pusher-N, or the name read from a plain message."""
    return msg[CLIENT] or f"Pusher-{msg[WORKER]}"


def decode(frame, run_cache):
    """Decode one frame into a message tuple (see above); raise InvalidMessage for bad input.

    run_cache (a dict, filled by new_run) maps the header's run bytes to a shared
    RunInfo, so a run costs one object and one parse, not one per message.
    """
    run = run_cache.get(frame[:RUN_KEY_SIZE])
    if run is None:
        if not frame:
            raise InvalidMessage("empty message")
        if frame[0] != 0xFF:
            return decode_plain(frame, run_cache)
        run = new_run(frame, run_cache)
    if len(frame) < HEADER_SIZE:
        raise InvalidMessage(f"truncated header ({len(frame)} bytes)")
    kind, flags, worker, task, intended_ns, sent_ns, text_len = MESSAGE_FIELDS.unpack_from(
        frame, RUN_KEY_SIZE)
    if kind > END or HEADER_SIZE + text_len > len(frame):
        raise InvalidMessage("bad header")
    # DATA: a task below messages per worker; END: at most that many tasks sent. A DATA
    # frame in range passes on one comparison of its task.
    if not 1 <= worker <= run.workers or (task >= run.messages_per_worker and (
            kind == DATA or task > run.messages_per_worker)):
        raise InvalidMessage(f"worker {worker} or task {task} outside its run" if kind == DATA
                             else f"worker {worker} claims {task} tasks sent of a run of"
                                  f" {run.messages_per_worker} per worker")
    try:
        text = frame[HEADER_SIZE:HEADER_SIZE + text_len].decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"text is not UTF-8 ({exc.reason})") from None
    # flags is 0 for almost every frame: that test first spares a flood 10 ns a message.
    if not flags:
        return frame, run, kind, worker, task, sent_ns, False, text, "", intended_ns
    return (frame, run, kind, worker, task, sent_ns, flags & FLAG_RESENT != 0, text, "",
            None if flags & FLAG_WARMUP else intended_ns)


def new_run(frame, run_cache):
    """Parse and remember the run fields of the first frame seen from a run.

    run_cache also maps each run id to its key: a later frame of the run whose run
    fields differ (workers, messages per worker, flags, endpoints) is invalid, so
    every frame of a run agrees with its first. Both kinds of key share one dict,
    bounded to RUNS_REMEMBERED runs, the oldest forgotten first.
    """
    if len(frame) < HEADER_SIZE:
        raise InvalidMessage(f"truncated header ({len(frame)} bytes)")
    magic, flags, endpoints, workers, per_worker, run_id = RUN_FIELDS.unpack_from(frame)
    if magic != WIRE_MAGIC or not workers or not endpoints:
        raise InvalidMessage("bad header")
    run = RunInfo(run_id, workers, per_worker, endpoints, bool(flags & FLAG_CONFIRM),
                  bool(flags & FLAG_SCHEDULED))
    return known_run(run_cache, run) or remember_run(run_cache, run, frame[:RUN_KEY_SIZE])


def known_run(run_cache, run):
    """The RunInfo run_cache holds for run's id, if it equals `run`; None if the id is
    new; InvalidMessage if it differs."""
    key = run_cache.get(run.run_id)
    if key is None:
        return None
    known = run_cache[key]
    if known != run:
        raise InvalidMessage(f"run {run_label(run.run_id)}: run fields differ from its first"
                             " frame's (sender instances that disagree about the run:"
                             " --workers, --messages, --instances, flags or receivers?)")
    return known  # the same run under another key (a text-format run id spelled anew)


def new_run_cache():
    """An empty run_cache for decode(): insertion-ordered, its oldest popped cheaply."""
    return collections.OrderedDict()


def remember_run(run_cache, run, key=None):
    """Put a run in run_cache (see new_run), forgetting the oldest run when it is full;
    returns it. key: the header's run bytes, built from `run` if not given."""
    if key is None:
        key = run_header(run)
    if len(run_cache) >= 2 * RUNS_REMEMBERED:
        # Inserted in pairs: key, then id. An OrderedDict (new_run_cache()) pops its
        # oldest in constant time; a dict's next(iter()) walks the slots its earlier
        # pops left: a new run cost 0.4 ms after 200,000 runs (issue 19, case 4).
        if isinstance(run_cache, collections.OrderedDict):
            _, oldest = run_cache.popitem(last=False)
        else:
            oldest = run_cache.pop(next(iter(run_cache)))
        run_cache.pop(oldest.run_id)
    run_cache[key] = run
    run_cache[run.run_id] = key
    return run


def decode_plain(frame, run_cache):
    """A single-frame text message: --format text from our sender, or another PUSH client."""
    try:
        text = frame.decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    # Control characters are allowed: logs.shown() escapes them in every log line.
    if TEXT_MARK in text:
        return decode_text_format(frame, text, run_cache)
    match = PLAIN_TEXT_PATTERN.match(text)
    if match:
        return frame, None, DATA, 0, int(match["task"]), 0, False, text, match["client"], None
    return frame, None, DATA, 0, -1, 0, False, text, "plain", None


def decode_text_format(frame, text, run_cache):
    """A --format text message: the seed's text, then the trailer with the run's accounting."""
    match = TEXT_PATTERN.match(text)
    if not match:
        raise InvalidMessage("bad text-format trailer")
    workers, per_worker = int(match["workers"]), int(match["messages"])
    worker, task, endpoints = int(match["worker"]), int(match["task"]), int(match["endpoints"])
    if not (1 <= worker <= workers and task < per_worker and 1 <= endpoints <= 0xFF):
        raise InvalidMessage(f"worker {worker} or task {task} outside its run")
    key = ("text", match["run"], workers, per_worker, endpoints)
    run = run_cache.get(key)
    if run is None:
        run = RunInfo(int(match["run"], 16), workers, per_worker, endpoints, scheduled=True)
        run = known_run(run_cache, run) or remember_run(run_cache, run, key)
    intended = None if match["warmup"] else int(match["intended"])
    return (frame, run, DATA, worker, task, int(match["sent"]), False, match["text"], "",
            intended)


def receive_messages(sock, limit, max_bytes, run_cache, invalid):
    """Up to `limit` messages waiting on `sock`, decoded, without blocking; it stops
    after the frame that brings their size to `max_bytes`.

    Returns (messages, how many of them are END frames, their size in bytes). A frame
    decode() rejects, or a plain-text message of several frames, is dropped and told
    to invalid(reason).
    """
    # The receive thread's hot path (bench/README.md, figure (2)):
    # recv() into bytes costs 0.15 µs a frame where recv(copy=False) made a zmq.Frame
    # for 0.5 µs; asking RCVMORE costs 0.6 µs, so it is asked only after frames not in
    # the wire format; the local aliases save 0.07 µs a frame. A plain DATA frame of the
    # run of the frame before it is decoded inline, with decode()'s checks: this loop,
    # recv() included, went from 0.84 to 0.74 µs of CPU a frame on a real socket
    # (bench/README.md, "Profiles", issue 22).
    messages = []
    append = messages.append
    recv, unpack = sock.recv, MESSAGE_FIELDS.unpack_from
    ends = size = 0
    key, run, workers, per_worker = None, None, 0, 0  # the last wire-format frame's run
    for _ in range(limit):
        if size >= max_bytes:
            break
        try:
            frame = recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        length = len(frame)
        size += length
        if key is not None and length >= HEADER_SIZE and frame.startswith(key):
            kind, flags, worker, task, intended_ns, sent_ns, text_len = unpack(
                frame, RUN_KEY_SIZE)
            if (not kind and not flags and HEADER_SIZE + text_len <= length
                    and 0 < worker <= workers and task < per_worker):
                try:
                    text = frame[HEADER_SIZE:HEADER_SIZE + text_len].decode()
                except UnicodeDecodeError:
                    pass  # decode() below rejects it, saying why
                else:
                    append((frame, run, DATA, worker, task, sent_ns, False, text, "",
                            intended_ns))
                    continue
        msg = decode_or_drop(sock, frame, run_cache, invalid)
        if msg is None:
            continue
        append(msg)
        if msg[KIND] == END:
            ends += 1
        if frame[0] == 0xFF:  # the wire format: the next frames are likely of its run
            key, run = frame[:RUN_KEY_SIZE], msg[RUN]
            workers, per_worker = run.workers, run.messages_per_worker
    return messages, ends, size


def decode_or_drop(sock, frame, run_cache, invalid):
    """decode() one frame; None, told to invalid(), for a frame it rejects or a plain-text
    message of several frames (its other frames dropped too)."""
    try:
        msg = decode(frame, run_cache)
    except InvalidMessage as exc:
        if not skipped_multipart(sock, invalid):
            invalid(str(exc))
        return None
    if msg[RUN] is None and skipped_multipart(sock, invalid):
        return None
    return msg


def skipped_multipart(sock, invalid):
    """After a frame: if more parts follow, drop them all and tell invalid() once."""
    if not sock.rcvmore:
        return False
    parts = 1
    while sock.rcvmore:
        sock.recv(copy=False)  # the rest of a message is already here
        parts += 1
    invalid(f"{parts}-frame message (the wire format has one frame)")
    return True
