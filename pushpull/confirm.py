"""The confirmation channel: a receiver's PUB tells --confirm senders what it processed.

Frames are [topic, ranges]: topic = run id (8 bytes), then (worker, first task,
count) triples for tasks processed since the last confirmation.
"""

import re
import struct

CONFIRM_TOPIC = struct.Struct("!Q")
CONFIRM_RANGE = struct.Struct("!III")


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
