"""Command-line and output helpers: flag types, shared flags, JSON and table output."""

import argparse
import csv
import dataclasses
import errno
import importlib
import ipaddress
import json
import math
import os
import platform
import random
import re
import socket
import sys
import tempfile
import time

import zmq

from pushpull.logs import LogSetupError, start_logging
from pushpull.stopsignals import StopSignals
from pushpull.security import generate_keys
from pushpull import wire

# Bounds of the flag values: no value beyond them reaches a socket, a loop or the wire.
MAX_PORT = 65535  # the largest TCP port; larger values would wrap silently in libzmq
# A worker is a thread with its own PUSH socket and 2 file descriptors (Linux).
# Measured after Ctrl+C: 1000 workers stop in 0.3 s, 10000 in 3 s, 100000 took 146 s.
MAX_WORKERS = 1000  # worker threads a sender may start
MAX_RUN_MESSAGES = wire.COUNT_MAX  # workers x messages: a run's counts fit a uint32 too
MIN_INTERVAL = 0.001  # seconds; libzmq counts whole ms, and reads 0 ms as "none"
MAX_SECONDS = 86400.0  # seconds (a day); every ms value stays inside libzmq's C int
MAX_HEARTBEAT_INTERVAL = 300.0  # seconds; ZMQ_HEARTBEAT_TTL (2 intervals) is a uint16 of 0.1 s
MAX_HWM = 1_000_000  # messages per connection; beyond that the high-water mark bounds nothing
MAX_FRAME_SIZE = 2**30  # bytes; a frame is built whole in memory; spill files store 4-byte sizes
MAX_QUEUE_SIZE = 10_000_000  # messages between the receiver's threads
MAX_QUEUE_BYTES = 2**40  # bytes between the receiver's threads (1 TiB): more than any memory
MAX_RETRIES = 1000  # waits of --timeout each; more is no bound on how long a worker waits
MIN_RATE, MAX_RATE = 0.001, 10_000_000.0  # msg/s: --rate's range (far beyond what a pair sends)
MAX_REPORT_TIMEOUT = 3600.0  # seconds: the longest --report-timeout (and --max-p99 in ms / 1000)
TCP_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^\[\]/:\s]+):(?P<port>[0-9]+)$")
IPC_ENDPOINT = re.compile(r"^ipc://\S+$")
# The optional packages of live metrics (--metrics-port, --hlog), and how to get them.
OPTIONAL_INSTALL = "pip install -r requirements-metrics.txt"


LOG_FILE_FAILED = 1  # exit status of a run whose log file could not be written to the end
SCHEMA_VERSION = 2  # of both JSON summaries; 2 added config, versions and the latency keys


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


def save_summary(path, data, log):
    """--json at exit: write the summary; False, with the reason logged, if it cannot be
    written after all (the disk filled up during the run), and no half file left."""
    try:
        write_json(path, data)
        return True
    except OSError as exc:
        log.error(f"[ERROR] cannot write the --json summary to {path}: {exc.strerror}")
        try:
            os.remove(f"{path}.tmp")
        except OSError:
            pass  # never created, or already gone
        return False


def run_facts(config, secret_fields=()):
    """What both JSON summaries start with: schema version, configuration as run, versions."""
    settings = {name: value for name, value in dataclasses.asdict(config).items()
                if name not in secret_fields}
    return {
        "schema_version": SCHEMA_VERSION,
        "config": settings,
        "versions": {"python": platform.python_version(), "pyzmq": zmq.__version__,
                     "libzmq": zmq.zmq_version()},
    }


class CsvSeries:
    """--csv: one row per stats interval, written and flushed as it comes; no file: no-op.

    A timed_row() starts with two clocks: time_s (monotonic, from the process's start)
    and unix_time (wall clock, to join the sender's and the receivers' files on); one
    whose other values repeat the last one's is left out, so an idle process writes none.
    """

    def __init__(self, path, columns):
        self._out = open(path, "w", newline="", encoding="utf-8") if path else None
        self._writer = csv.writer(self._out) if self._out else None
        self._last = None  # the values (clocks aside) of the last timed row written
        self.row(columns)

    def row(self, values):
        """Write one row (a no-op without a file)."""
        if self._writer is not None:
            self._writer.writerow(values)
            self._out.flush()

    def timed_row(self, time_s, values, always=False):
        """Write `time_s`, the wall clock now, then `values`; left out when `values`
        repeat the last timed row's, unless `always`."""
        values = tuple(values)
        if values == self._last and not always:
            return
        self._last = values
        self.row((round(time_s, 3), round(time.time(), 3), *values))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the file, if any."""
        if self._out is not None:
            self._out.close()


def check_output_path(parser, flag, path):
    """At start, before any work: exit 2 with a one-line reason (parser.error) unless a
    file can be written at `path`, rather than find out at the end of a run."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a directory")
    if not os.path.isdir(directory):
        parser.error(f"{flag} {path}: directory {directory} does not exist")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass  # a real write: permission bits alone do not tell (root, ACLs, read-only mounts)
    except OSError as exc:
        parser.error(f"{flag} {path}: cannot write in {directory} ({exc.strerror})")


def ensure_open_files(needed):
    """Raise this process's open-file limit to `needed` where the OS lets it; returns the
    limit then in force, or None where there is no such limit to read (Windows)."""
    try:
        import resource  # POSIX only; Windows has no per-process limit of this kind
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


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
        status = body(config, signals, log)
    finally:
        listener.stop()
        signals.ignore()  # the status is decided: no signal may turn it into death by one
    # A log file that could not be written (its [ERROR] line is on the console): the log
    # is incomplete, which the exit status says too.
    return status or (LOG_FILE_FAILED if listener.failures else 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default said once: not when it is None (the help says what
    happens then), nor when the help says it in its own words ("default: ...")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default:" in text:
            return text
        return super()._get_help_string(action)


def add_key_flag(parser):
    """--generate-keys, which both scripts have."""
    parser.add_argument("--generate-keys", metavar="DIR",
                        help="write server and client certificates into DIR, then exit")


def add_report_flags(parser, quiet, stats_interval, json_path, csv_path=None):
    """The output flags both scripts share: statistics, JSON summary, CSV.

    The defaults are the calling script's own constants, named in each help text.
    """
    parser.add_argument("--quiet", action="store_true", default=quiet,
                        help="no per-message lines, only stats and summary (QUIET)")
    parser.add_argument("--stats-interval", metavar="SECONDS",
                        type=seconds(MIN_INTERVAL, MAX_SECONDS),
                        default=stats_interval,
                        help="seconds between [STATS] lines (STATS_INTERVAL)")
    parser.add_argument("--json", metavar="PATH", default=json_path,
                        help="on exit, write the summary as JSON to PATH (JSON_SUMMARY)")
    parser.add_argument("--csv", metavar="FILE", default=csv_path,
                        help="write one row per stats interval to FILE (CSV_FILE)")


def add_live_flags(parser, metrics_port, metrics_bind, metrics_hold, hlog_path):
    """The flags of live metrics (docs/metrics.md): the Prometheus endpoint, the .hlog file.
    The defaults are the calling script's own constants, named in each help text."""
    parser.add_argument("--metrics-port", metavar="PORT", type=port, default=metrics_port,
                        help="serve Prometheus metrics at http://ADDRESS:PORT/metrics; needs"
                             " prometheus-client (METRICS_PORT)")
    parser.add_argument("--metrics-bind", metavar="ADDRESS", type=listen_address,
                        default=metrics_bind,
                        help="address of the metrics endpoint, * for every interface"
                             " (METRICS_BIND)")
    parser.add_argument("--metrics-hold", metavar="SECONDS", type=seconds(0, MAX_SECONDS),
                        default=metrics_hold,
                        help="at exit, serve the final figures until a scrape has read them,"
                             " at most SECONDS (METRICS_HOLD)")
    parser.add_argument("--hlog", metavar="FILE", default=hlog_path,
                        help="write an HdrHistogram interval log of latency per stats interval"
                             " to FILE; needs hdrhistogram (HLOG_FILE)")


def check_live_flags(parser, args):
    """At start: the optional packages the live-metrics flags need are installed, and the
    --hlog file can be written; else exit 2 with one line."""
    if args.metrics_port is not None:
        require_package(parser, "--metrics-port", "prometheus_client", "prometheus-client")
    if args.hlog is not None:
        require_package(parser, "--hlog", "hdrh.histogram", "hdrhistogram")
        check_output_path(parser, "--hlog", args.hlog)


def require_package(parser, flag, module, package):
    """Import an optional package's `module`, or exit 2 with one line naming `package` and
    how to install it."""
    try:
        importlib.import_module(module)
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: {flag} needs the {package} package, which is"
                       f" not installed: pip install {package} (or {OPTIONAL_INSTALL})\n")


# Below Linux's ephemeral range (32768-60999) and Windows' (49152-65535): a port handed
# out by bind(0) could be taken by any outgoing connection's source port before the
# receiver binds it, which happened in the suite about once a run.
FREE_PORTS = range(20000, 32766, 2)  # first ports of the pairs free_port() picks from


def free_port():
    """A free TCP port on 127.0.0.1 whose successor (the confirmation port) is free too.

    For the demo, the tests and the benchmark, which run pairs side by side.
    """
    while True:
        port = random.choice(FREE_PORTS)
        if pair_is_free(port):
            return port


def pair_is_free(port):
    """True when `port` and its successor can both be bound on 127.0.0.1 now."""
    try:
        with socket.socket() as probe, socket.socket() as confirm:
            probe.bind(("127.0.0.1", port))
            confirm.bind(("127.0.0.1", port + 1))
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# Flag types: every value is bounded here, so no bad value reaches a socket or a loop
# ---------------------------------------------------------------------------
def port(text):
    """An argparse type: a TCP port number, 1 to MAX_PORT."""
    value = _integer(text)
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1-{MAX_PORT})")
    return value


def count(low, high):
    """An argparse type: an integer from `low` to `high`."""
    def parse(text):
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not an integer from {low} to {high}")
        return value
    return parse


def number(low, high, unit):
    """An argparse type: a finite number of `unit` from `low` to `high` (never nan or inf)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not a number of {unit}"
                                             f" from {low:.15g} to {high:.15g}")
        return value
    return parse


def seconds(low, high):
    """An argparse type: a finite number of seconds from `low` to `high`."""
    return number(low, high, "seconds")


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def endpoint(text):
    """An argparse type: a receiver endpoint, tcp://HOST:PORT (IPv6 in brackets) or ipc://PATH."""
    if text.startswith("inproc://"):
        raise argparse.ArgumentTypeError(f"{text}: inproc:// is refused, because no receiver"
                                         f" can live in another process")
    if IPC_ENDPOINT.match(text):
        return text
    match = TCP_ENDPOINT.match(text)
    if not match:
        hint = " (an IPv6 address goes in brackets: tcp://[::1]:5560)" \
            if text.startswith("tcp://") and text.count(":") > 2 else ""
        raise argparse.ArgumentTypeError(f"{text} is not tcp://HOST:PORT or ipc://PATH{hint}")
    host = match["host"]
    if host == "*":  # libzmq: Invalid argument, in every thread that connects
        raise argparse.ArgumentTypeError(f"{text}: * is for binding to every interface;"
                                         " connect to a host name or address")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: {host} is not an IPv6 address") from None
    if not 1 <= int(match["port"]) <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text}: port {match['port']} is not 1-{MAX_PORT}")
    return text


def wants_ipv6(endpoints):
    """True if an endpoint names an IPv6 address (tcp://[ADDRESS]:PORT).

    Only then does a socket get ZMQ_IPV6: with it, libzmq may resolve a host name
    such as localhost to ::1, where a receiver bound to IPv4 would not answer.
    """
    return any(endpoint.startswith("tcp://[") for endpoint in endpoints)


def ip_address(text):
    """An argparse type: an IPv4 or IPv6 address (never a host name), in its usual form."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not an IP address (a host name is never"
                                         f" matched: give its address)") from None


def bind_address(text):
    """An argparse type: the address to bind: *, an IP address (IPv6 with or without
    brackets) or an interface name; whether this host has it is seen at bind time."""
    address = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not address or any(ch.isspace() or ch in "/[]" for ch in address):
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or interface name")
    return address


def listen_address(text):
    """An argparse type: an IP address to listen on (IPv6 with or without brackets), or *
    for every interface."""
    if text == "*":
        return text
    try:
        return str(ipaddress.ip_address(text[1:-1] if text.startswith("[") else text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not an IP address or *") from None


def tcp_endpoint(host, port_number):
    """tcp://HOST:PORT, with an IPv6 address in brackets."""
    if ":" in host:
        return f"tcp://[{host}]:{port_number}"
    return f"tcp://{host}:{port_number}"


def bind_error(endpoint, what, address, exc):
    """A one-line reason why a socket could not bind `endpoint` (what: "port 5560")."""
    if exc.errno == zmq.EADDRINUSE:
        reason = f"{what} is in use by another program"
    elif exc.errno == zmq.EADDRNOTAVAIL:
        reason = f"{address!r} is not an address of this host"
    elif exc.errno == errno.ENODEV:  # pyzmq 27 has no zmq.ENODEV; libzmq uses errno's
        reason = f"{address!r} is neither an address nor an interface of this host"
    elif exc.errno == zmq.EINVAL:
        reason = f"{address!r} is not a valid address"
    else:
        reason = zmq.strerror(exc.errno)
    return f"cannot bind {endpoint}: {reason}"
