#!/usr/bin/env python3
"""The demo: a receiver and a sender run together, both summaries printed.

    python3 demo.py

Starts async-socket-receiver.py on a free port of 127.0.0.1 (in a temporary
directory, so its log and spill files leave no trace), waits for its
"Server is running" line, runs async-socket-sender.py with the seed's defaults
(20 workers x 10 messages) but a shorter delay, then stops the receiver the way
Ctrl+C would (a warm stop: it processes its backlog, prints its summary, exits).
Both processes' output is passed through, prefixed with who printed it.

Exit status: 0 when both scripts exit 0, 1 otherwise. Installs nothing: it
needs the pyzmq of requirements.txt.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pushpull.cli import free_port

ROOT = Path(__file__).resolve().parent
RECEIVER = ROOT / "async-socket-receiver.py"
SENDER = ROOT / "async-socket-sender.py"
READY_LINE = "Server is running"
RECEIVER_ARGS = ["--processing-time", "0.01", "--stats-interval", "1"]
SENDER_ARGS = ["--delay", "0.05"]  # seed defaults otherwise: 20 workers x 10 messages
READY_TIMEOUT = 15.0  # seconds the receiver may take to say it is running
SENDER_TIMEOUT = 120.0  # seconds the sender may take
STOP_TIMEOUT = 30.0  # seconds the receiver may take to stop after the signal
WINDOWS = sys.platform == "win32"


LOOK_FOR = """\
What to look for:
  - sender: planned = sent, flush complete; receiver: received = processed, and a [RUN] line
    for the run with missing 0: every message that left the sender was worked on.
  - receiver: the run's latency (p50, p99, max): from the sender's timestamp to the receive.
  - try it again with the receiver stopped, or killed mid-run: the counts say what was lost."""


def pass_through(stream, prefix, kept, ready=None):
    """Copy a child's output to the console line by line, keeping it in `kept`;
    set `ready` at the ready line."""
    for line in stream:
        kept.append(line)
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()
        if ready is not None and READY_LINE in line:
            ready.set()
    stream.close()


def start(script, args, cwd, prefix, ready=None):
    """Start a script with its output piped through a pass-through thread.

    Returns (process, thread, lines): `lines` fills with the script's output.
    """
    extra = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS else {}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
        env=dict(os.environ, PYTHONUNBUFFERED="1"), **extra)
    lines = []
    thread = threading.Thread(target=pass_through, args=(proc.stdout, prefix, lines, ready),
                              daemon=True)
    thread.start()
    return proc, thread, lines


def summary_of(lines):
    """The summary table at the end of a script's output (its '==== ... ====' block)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("==== ")]
    if not starts:
        return "(no summary printed)\n"
    block = []
    for line in lines[starts[-1]:]:
        if block and not line.startswith("  "):
            break
        block.append(line)
    return "".join(block)


def stop(proc):
    """Ctrl+C for the receiver: SIGINT, or CTRL_BREAK_EVENT (SIGBREAK) on Windows."""
    proc.send_signal(signal.CTRL_BREAK_EVENT if WINDOWS else signal.SIGINT)


def wait_ready(proc, ready, timeout):
    """Wait for the ready line; False if the receiver exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() >= deadline:
            return False
    return True


def wait(proc, timeout, name):
    """Wait for exit; kill and report after `timeout` seconds. Returns the exit status."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"demo: {name} still running after {timeout:g} s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()
        return None


def main():
    """Run the pair once; returns 0 when both scripts succeeded."""
    if importlib.util.find_spec("zmq") is None:
        print("demo: pyzmq is not installed; run: python3 -m pip install -r requirements.txt",
              file=sys.stderr)
        return 1
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="pushpull-demo-") as cwd:
        print(f"demo: receiver on {endpoint}, working directory {cwd}")
        ready = threading.Event()
        receiver, receiver_out, receiver_lines = start(
            RECEIVER, ["--port", str(port), "--bind", "127.0.0.1", *RECEIVER_ARGS], cwd,
            "receiver |", ready)
        try:
            if not wait_ready(receiver, ready, READY_TIMEOUT):
                status = receiver.poll()
                receiver_out.join(2)
                print(f"demo: the receiver did not start (exit status {status})",
                      file=sys.stderr)
                return 1
            sender, sender_out, sender_lines = start(SENDER, ["--connect", endpoint, *SENDER_ARGS], cwd,
                                       "sender   |")
            sender_status = wait(sender, SENDER_TIMEOUT, "sender")
            sender_out.join(5)
            stop(receiver)
            receiver_status = wait(receiver, STOP_TIMEOUT, "receiver")
            receiver_out.join(5)
        except KeyboardInterrupt:
            # Ctrl+C reached the children too: let them stop and print their summaries.
            print("demo: interrupted; waiting for the scripts to stop", file=sys.stderr)
            wait(receiver, STOP_TIMEOUT, "receiver")
            receiver_out.join(5)
            return 130
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
    print("\ndemo: both summaries together\n")
    print(summary_of(sender_lines) + "\n" + summary_of(receiver_lines) + "\n" + LOOK_FOR + "\n")
    print(f"demo: sender exit status {sender_status}, receiver exit status {receiver_status}")
    return 0 if sender_status == 0 and receiver_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
