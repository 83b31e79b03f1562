"""The confirmation channel's format, and the receiver's publisher on it.

Every message is three frames, sealed with a key only the run's sender and the
receivers holding its data know (docs/internals.md, "The confirmation channel"):
    [topic (8 bytes), body, mac (16 bytes)]
topic = the first 8 bytes of HMAC-SHA256(run id, "topic"); body = a kind byte,
then the payload; mac = the first 16 bytes of HMAC-SHA256(run id, topic + body).
The run id travels only in data frames, so a peer that binds the confirmation
port sees a topic it cannot invert and cannot seal a message of its own.
Kinds: CONFIRM, (worker, first task, count) triples processed since the last
one; REPORT, the receiver's 8-byte instance id then its runs[] entry as JSON,
published when the run's [RUN] line is logged (again when a run reported incomplete
completes), then repeated every CONFIRM_INTERVAL for REPORT_REPEAT_S: PUB drops what
no subscription has asked for yet, and a sender's subscription may reach the receiver
after a short run ended. A sender counts each receiver instance's report once.

Here: the frame format and the endpoint rule both ends share, then the receiver's
publisher. The sender's side: pushpull/listener.py (the listener) and
pushpull/windows.py (its unconfirmed windows, when to resend).
"""

import collections
import enum
import hashlib
import hmac
import json
import os
import struct
import time

import zmq

from pushpull import verdict
from pushpull.cli import MAX_PORT, TCP_ENDPOINT

RUN_KEY = struct.Struct("!Q")  # the run id, as the HMAC key
CONFIRM_RANGE = struct.Struct("!III")
TOPIC_SIZE = 8  # bytes of the derived topic
MAC_SIZE = 16  # bytes of the truncated HMAC-SHA256
RECEIVER_ID_SIZE = 8  # bytes of a receiver's random instance id, in a REPORT
TOPIC_LABEL = b"pushpull confirmation topic"
SEAL_CACHE_SIZE = 1024  # runs whose keys a receiver keeps derived
# A run's report is repeated this long after its [RUN] line: twice the sender's default
# --report-timeout, which starts about when the run ends.
REPORT_REPEAT_S = 10.0  # seconds
REPORTS_REPEATED = 16  # runs whose reports are repeated at once (the latest reported): at most
# 16 x REPORT_MAX_BYTES held, and 16 sends every CONFIRM_INTERVAL (the receiver's, 50 ms)


class Kind(enum.IntEnum):
    """What a confirmation-channel message carries."""

    CONFIRM = 1  # (worker, first task, count) triples processed
    REPORT = 2  # the receiver's runs[] entry for the run, when its [RUN] line is logged
    # (then repeated for late subscribers: REPORT_REPEAT_S)


class RunSeal:
    """The keys of one run's confirmation channel, derived from its run id."""

    def __init__(self, run_id):
        self._key = RUN_KEY.pack(run_id)
        self.topic = self._mac(TOPIC_LABEL)[:TOPIC_SIZE]

    def _mac(self, data):
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def seal(self, kind, payload):
        """The three frames of one message of `kind`."""
        body = bytes([kind]) + payload
        return [self.topic, body, self._mac(self.topic + body)[:MAC_SIZE]]

    def open(self, frames):
        """(Kind, payload) of a message sealed for this run, or None for anything else."""
        if len(frames) != 3 or frames[0] != self.topic or len(frames[2]) != MAC_SIZE:
            return None
        body = frames[1]
        if not body or not hmac.compare_digest(self._mac(self.topic + body)[:MAC_SIZE],
                                               frames[2]):
            return None
        try:
            return Kind(body[0]), body[1:]
        except ValueError:
            return None


TASK_BITS = 32  # a processed task's key: worker << TASK_BITS | task (a task is a uint32)
TASK_MASK = (1 << TASK_BITS) - 1


def task_key(worker, task):
    """The key of a processed task in ConfirmPublisher: one int, sorted by worker, then task."""
    return worker << TASK_BITS | task


def task_ranges(keys):
    """(worker, first task, count) triples covering the tasks whose task_key()s are in
    `keys`, each task once."""
    # Once per publication, over every task processed since the last one: over sorted
    # ints, 0.05 µs a task where (worker, task) pairs took 0.13 µs (bench/README.md,
    # "Profiles", issue 22). A range never spans two
    # workers: a task is below COUNT_MAX, so the key after a worker's last task is
    # never the next worker's first.
    ranges, end = [], -1  # end: the key just after the last range
    for key in sorted(keys):
        if key == end:
            last[2] += 1
            end += 1
        elif key > end:  # (below it: a task listed twice)
            last = [key >> TASK_BITS, key & TASK_MASK, 1]
            ranges.append(last)
            end = key + 1
    return ranges


def encode_confirmations(seal, keys):
    """One CONFIRM message for the tasks processed (their task_key()s), sealed for its run."""
    body = b"".join(CONFIRM_RANGE.pack(*triple) for triple in task_ranges(keys))
    return seal.seal(Kind.CONFIRM, body)


def decode_confirmations(body):
    """(worker, first task, count) triples from a confirmation body."""
    usable = len(body) - len(body) % CONFIRM_RANGE.size
    return [CONFIRM_RANGE.unpack_from(body, offset)
            for offset in range(0, usable, CONFIRM_RANGE.size)]


def confirm_port(data_port, port=None):
    """The port confirmations are published on: `port` when given, else the data port + 1.

    ValueError when that is no port number (data port 65535 without `port`)."""
    result = port if port else data_port + 1
    if not 1 <= result <= MAX_PORT:
        raise ValueError(f"confirmation port {result} is not a port number (1-{MAX_PORT}):"
                         " give --confirm-port")
    return result


def confirm_endpoint(endpoint, port=None):
    """Where the receiver at `endpoint` publishes confirmations: the same host, confirm_port()."""
    match = TCP_ENDPOINT.match(endpoint)
    if not match:
        raise ValueError(f"--confirm needs tcp://HOST:PORT endpoints, not {endpoint}")
    return f"tcp://{match['host']}:{confirm_port(int(match['port']), port)}"


# ---------------------------------------------------------------------------
# The receiver's side: what was processed and not yet confirmed, and each run's report
# ---------------------------------------------------------------------------
class ConfirmPublisher:
    """Publishes on the processor's PUB socket, sealed for each run: the tasks processed
    but not yet confirmed, at most every `interval` seconds (one CONFIRM per run), and a
    run's report when its [RUN] line is logged, repeated every `interval` for
    REPORT_REPEAT_S (a subscription that came late still hears it)."""

    def __init__(self, sock, interval):
        self.sock = sock
        self.interval = interval
        self.receiver_id = os.urandom(RECEIVER_ID_SIZE)  # tells a sender which reports match
        self._pending = {}  # run id -> [task_key(), ...] since the last publication
        self._seals = {}  # run id -> RunSeal: one key derivation per run, not per message
        # run id -> (monotonic time its repeats end, its sealed REPORT), oldest first
        self._repeats = collections.OrderedDict()
        self._next = 0.0

    def add(self, run_id, worker, task):
        """A task of a --confirm run was processed (or arrived again after it was)."""
        self._pending.setdefault(run_id, []).append(worker << TASK_BITS | task)

    def add_keys(self, run_id, keys):
        """add() for many tasks of one run, given by their task_key()s."""
        self._pending.setdefault(run_id, []).extend(keys)

    def publish_if_due(self):
        """Publish what is pending, and repeat the recent reports, if `interval` has passed
        since the last publication."""
        if (self._pending or self._repeats) and time.monotonic() >= self._next:
            self.publish()

    def publish(self):
        """Publish what is pending now, and repeat the reports of runs closed lately."""
        now = time.monotonic()
        self._next = now + self.interval
        pending, self._pending = self._pending, {}
        for run_id, tasks in pending.items():
            self._send(encode_confirmations(self._seal(run_id), tasks))
        self._repeat_reports(now)

    def report(self, run_id, entry):
        """Publish a run's runs[] entry (its report), cut to REPORT_MAX_BYTES; publish()
        repeats it for REPORT_REPEAT_S."""
        frames = self._seal(run_id).seal(Kind.REPORT, self.receiver_id + report_json(entry))
        self._send(frames)
        self._repeats.pop(run_id, None)  # a later report (the run healed) replaces it
        self._repeats[run_id] = (time.monotonic() + REPORT_REPEAT_S, frames)
        if len(self._repeats) > REPORTS_REPEATED:
            self._repeats.popitem(last=False)

    def _repeat_reports(self, now):
        """Send again each report whose REPORT_REPEAT_S has not passed; forget the others."""
        while self._repeats and next(iter(self._repeats.values()))[0] <= now:
            self._repeats.popitem(last=False)  # the oldest first: each ends REPORT_REPEAT_S on
        for _, frames in self._repeats.values():
            self._send(frames)

    def _seal(self, run_id):
        seal = self._seals.get(run_id)
        if seal is None:
            if len(self._seals) >= SEAL_CACHE_SIZE:
                self._seals.clear()  # bounded: recomputed on demand
            seal = self._seals[run_id] = RunSeal(run_id)
        return seal

    def _send(self, frames):
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB never blocks; a sender that misses a confirmation resends


def report_json(entry):
    """A runs[] entry as JSON of at most REPORT_MAX_BYTES: long lists are cut until it fits."""
    entry = dict(entry)
    data = json.dumps(entry, separators=(",", ":")).encode()
    while len(data) > verdict.REPORT_MAX_BYTES:
        lists = [key for key, value in entry.items() if isinstance(value, list) and value]
        if not lists:
            kept = (*verdict.COUNTS, "run_id", "missing", "latency_ms")  # what the sender uses
            return json.dumps({key: entry[key] for key in kept if key in entry}).encode()
        longest = max(lists, key=lambda key: len(entry[key]))
        entry[longest] = entry[longest][:len(entry[longest]) // 2]
        data = json.dumps(entry, separators=(",", ":")).encode()
    return data
