#!/usr/bin/env python3
"""The limit: raw pyzmq PUSH -> PULL in a tight loop, one process per side.

    python3 bench/raw_pushpull.py pull PORT COUNT      # binds, prints READY, then a JSON result
    python3 bench/raw_pushpull.py push PORT COUNT SIZE # connects and sends COUNT frames of SIZE bytes
    python3 bench/raw_pushpull.py lat-pull PORT COUNT  # latency: binds, prints READY, then p50/p99/max
    python3 bench/raw_pushpull.py lat-push PORT THREADS COUNT DELAY SIZE
                                                       # THREADS sockets, each COUNT time-stamped
                                                       # frames, DELAY s apart (the pair's pattern)
    python3 bench/raw_pushpull.py rate-push PORT THREADS RATE COUNT SIZE
                                                       # paced: RATE frames/s in all, open loop,
                                                       # stamped with their intended send time

The PULL side times from the first frame received to the last, so process start-up and
connection set-up are not counted: this is the best case the pair can hope for.
Used by run_bench.py; stdlib + pyzmq only.
"""

import json
import struct
import sys
import threading
import time

import zmq


def pull(port, count):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print("READY", flush=True)
    recv = sock.recv
    if not sock.poll(30000):
        print(json.dumps({"error": "no frame within 30 s"}), flush=True)
        return 1
    first = recv()
    started = time.perf_counter()
    for _ in range(count - 1):
        recv()
    elapsed = time.perf_counter() - started
    print(json.dumps({"count": count, "size": len(first), "seconds": elapsed,
                      "msg_per_s": (count - 1) / elapsed if elapsed > 0 else 0.0}), flush=True)
    sock.close(linger=0)
    ctx.term()
    return 0


def push(port, count, size):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"tcp://127.0.0.1:{port}")
    frame = b"x" * size
    send = sock.send
    for _ in range(count):
        send(frame)
    sock.close(linger=10000)
    ctx.term()
    return 0


def lat_pull(port, count):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print("READY", flush=True)
    latencies = []
    while len(latencies) < count and sock.poll(10000):
        frame = sock.recv()
        latencies.append(time.time_ns() - struct.unpack_from("!q", frame)[0])
    latencies.sort()
    n = len(latencies)
    if not n:
        print(json.dumps({"error": "no frame within 10 s"}), flush=True)
        return 1
    pick = lambda fraction: latencies[min(n - 1, int(fraction * n))] / 1e6  # noqa: E731
    print(json.dumps({"count": n, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
                      "p99_9_ms": pick(0.999), "max_ms": latencies[-1] / 1e6}), flush=True)
    sock.close(linger=0)
    ctx.term()
    return 0


def lat_push(port, threads, count, delay, size):
    ctx = zmq.Context()
    padding = b"x" * max(0, size - 8)

    def worker():
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"tcp://127.0.0.1:{port}")
        pause = threading.Event()
        for _ in range(count):
            sock.send(struct.pack("!q", time.time_ns()) + padding)
            pause.wait(delay)
        sock.close(linger=5000)

    return run_threads(ctx, [threading.Thread(target=worker) for _ in range(threads)])



def run_threads(ctx, workers):
    """Start the sending threads, wait for them all, then let the context flush; returns 0."""
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    ctx.term()
    return 0

def rate_push(port, threads, rate, count, size):
    """Like the pair's --rate: each thread's frame k is due at start + (n + k x threads) / rate,
    sent at once when late, stamped with that intended time (latency without coordinated
    omission, the floor for the pair's latency_ms)."""
    ctx = zmq.Context()
    padding = b"x" * max(0, size - 8)
    start_mono, start_ns = time.monotonic() + 0.2, time.time_ns() + 200_000_000
    stop = threading.Event()

    def worker(number):
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for k in range(count):
            due = (number + k * threads) / rate
            wait = start_mono + due - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            sock.send(struct.pack("!q", start_ns + int(due * 1e9)) + padding)
        sock.close(linger=5000)

    return run_threads(ctx, [threading.Thread(target=worker, args=(n,))
                             for n in range(threads)])


def main(argv):
    if len(argv) >= 6 and argv[0] == "rate-push":
        return rate_push(int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4]),
                         int(argv[5]))
    if len(argv) >= 3 and argv[0] == "lat-pull":
        return lat_pull(int(argv[1]), int(argv[2]))
    if len(argv) >= 6 and argv[0] == "lat-push":
        return lat_push(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]))
    if len(argv) >= 3 and argv[0] == "pull":
        return pull(int(argv[1]), int(argv[2]))
    if len(argv) >= 4 and argv[0] == "push":
        return push(int(argv[1]), int(argv[2]), int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
