"""Command-line and output helpers: flag types, shared flags, JSON and table output."""

import errno
import json
import os
import socket
import sys

from pushpull.logs import LogSetupError, start_logging
from pushpull.flow import StopSignals
from pushpull.security import generate_keys

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


def bind_error(endpoint, what, address, exc):
    """A one-line reason why a socket could not bind `endpoint` (what: "port 5560")."""
    if exc.errno == errno.EADDRINUSE:
        reason = f"{what} is in use by another program"
    elif exc.errno in (errno.EINVAL, errno.ENODEV, errno.EADDRNOTAVAIL):
        reason = f"bad address {address!r} ({exc.strerror})"
    else:
        reason = exc.strerror
    return f"cannot bind {endpoint}: {reason}"
