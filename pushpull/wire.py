"""The wire format: one ZeroMQ frame per message, its encoder and its decoder.

One frame per message:  HEADER (40 bytes) + UTF-8 text + padding.
The first byte 0xFF can never start valid UTF-8 text, so a frame from any
other PUSH client (plain text) is never mistaken for one of ours.
The header's first 20 bytes are the same in every frame of a run, so the
receiver looks the run up by those bytes instead of parsing them each time.
"""

import enum
import re
import struct
import time
from dataclasses import dataclass

import zmq

WIRE_MAGIC = b"\xff\x01"  # 0xFF, then format version 1
RUN_FIELDS = struct.Struct("!2sBBIIQ")
# magic, run flags, endpoints, workers, messages per worker, run id
MESSAGE_FIELDS = struct.Struct("!BBIIqH")
# kind, message flags, worker, task, sent time (ns since the epoch), text length
HEADER = struct.Struct("!2sBBIIQBBIIqH")  # RUN_FIELDS then MESSAGE_FIELDS
COUNT_MAX = 2**32 - 1  # workers, messages per worker, tasks and an END's count are uint32
MESSAGE_TAIL = struct.Struct("!IqH")  # task, sent time, text length: what a worker varies
HEADER_SIZE = HEADER.size
RUN_KEY_SIZE = RUN_FIELDS.size
RESENT_OFFSET = RUN_KEY_SIZE + 1  # byte offset of the message flags
SEND_TIME = struct.Struct("!q")
SEND_TIME_OFFSET = RUN_KEY_SIZE + struct.calcsize("!BBII")  # byte offset of the send time
FLAG_CONFIRM = 0x01  # run flag: the sender wants confirmations (--confirm)
FLAG_RESENT = 0x01  # message flag: a resend of a task that was not confirmed in time
MESSAGE_TEXT = "Pusher-{worker}[PID:{pid}/TID:{tid}] - Task {task}"
RUN_CACHE_SIZE = 1024  # runs remembered by decode() before the cache starts over
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
#     sent_ns  send time, ns since the epoch (0 for plain text)
#     resent   True for a --confirm sender's resend
#     text     the message text
#     client   the name read from plain text; "" for frames in the wire format
# The receiver decodes one per message. A tuple subclass with named fields
# (namedtuple's accessors, tuple's own constructor) cost 0.13 µs more to build and
# 0.05 µs more to unpack: under the load of figure (2) (bench/README.md) the
# receiver's CPU per message rose by 10 %, and the pair's throughput fell by as
# much. The hot paths unpack the tuple into names instead.
RAW, RUN, KIND, WORKER, TASK, SENT_NS, RESENT, TEXT, CLIENT = range(9)


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
    kind, flags, worker, task, sent_ns, text_len = MESSAGE_FIELDS.unpack_from(frame, RUN_KEY_SIZE)
    if kind > END or HEADER_SIZE + text_len > len(frame):
        raise InvalidMessage("bad header")
    if not 1 <= worker <= run.workers or (kind == DATA and task >= run.messages_per_worker):
        raise InvalidMessage(f"worker {worker} or task {task} outside its run")
    try:
        text = frame[HEADER_SIZE:HEADER_SIZE + text_len].decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"text is not UTF-8 ({exc.reason})") from None
    return frame, run, kind, worker, task, sent_ns, flags & FLAG_RESENT != 0, text, ""


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


def receive_messages(sock, limit, run_cache, invalid):
    """Up to `limit` messages waiting on `sock`, decoded, without blocking.

    Returns (messages, how many of them are END frames). A frame decode() rejects,
    or a plain-text message of several frames, is dropped and told to invalid(reason).
    """
    # The receive thread's hot path (bench/README.md, figure (2)):
    # recv() into bytes costs 0.15 µs a frame where recv(copy=False) made a zmq.Frame
    # for 0.5 µs; asking RCVMORE costs 0.6 µs, so it is asked only after frames not in
    # the wire format; the local alias of recv saves 0.07 µs a frame.
    messages = []
    recv = sock.recv
    ends = 0
    for _ in range(limit):
        try:
            frame = recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        try:
            msg = decode(frame, run_cache)
        except InvalidMessage as exc:
            if not skipped_multipart(sock, invalid):
                invalid(str(exc))
            continue
        if msg[RUN] is None and skipped_multipart(sock, invalid):
            continue
        messages.append(msg)
        if msg[KIND] == END:
            ends += 1
    return messages, ends


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
