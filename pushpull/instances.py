"""One run across many sender processes and hosts: --instances, --run-id, --start-at.

A distributed run is one run whose workers live in several processes. Instance K
of N runs workers K x W + 1 ... K x W + W of a run of N x W workers (W: --workers);
every frame carries the run's totals, so each receiver counts and reports one run.
--messages is per worker; --rate and --duration are the whole run's, and each worker
keeps its place in the one schedule (schedule.worker_schedule with N x W workers).

The run's 64-bit wire id is derived from --run-id (BLAKE2b). It keys the seal of the
confirmation channel (channel.RunSeal), so a guessable ID would make reports
forgeable: without a shared secret (RUN_SECRET_ENV), the ID must be a random token
(see check_run_id); with one, the secret is mixed into the wire id.
"""

import argparse
import collections
import datetime
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass

from pushpull import cli, schedule

MAX_INSTANCES = 10_000  # sender instances of one run (each has --workers workers)
MAX_PROCESSES = 64  # --processes: child processes on one machine
RUN_ID_MAX_LENGTH = 253  # characters of --run-id (a DNS name's limit; a Job UID has 36)
RUN_ID_HEX_DIGITS = 32  # hex digits a --run-id needs without a secret: a UUID has 32
MIN_SECRET_BITS = 64  # estimated bits of entropy a run id or secret must hold
RUN_SECRET_ENV = "PUSHPULL_RUN_SECRET"  # environment variable: a secret the instances share
RUN_ID_PERSON = b"pushpull run id"  # BLAKE2b personalisation: our ids, nobody else's hashes
START_AT_RANGE = 86400.0  # seconds: --start-at at most this far from now, either way
RUN_ID_CHARACTERS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class Plan:
    """This process's place in a run: which instance of how many, the run's name and start."""

    instances: int = 1
    instance: int = 0
    run_name: "str | None" = None  # --run-id as given; None: a run of its own
    wire_id: "int | None" = None  # the 63-bit id derived from run_name; None: random
    start_ns: "int | None" = None  # --start-at as ns since the epoch; None: at once
    processes: int = 1

    @property
    def shared(self):
        """True when this process is one instance of a run of several."""
        return self.instances > 1

    def first_worker(self, workers):
        """The run-wide number of this instance's first worker, less one."""
        return self.instance * workers

    def run_workers(self, workers):
        """Workers in the whole run."""
        return self.instances * workers


def add_flags(parser, instances, instance, run_id, start_at, processes):
    """The flags of a run shared by several processes; defaults from the script's constants."""
    parser.add_argument("--instances", metavar="N", type=cli.count(1, MAX_INSTANCES),
                        default=instances,
                        help="sender instances sharing one run, each with --workers workers"
                             " (NUM_INSTANCES)")
    parser.add_argument("--instance", metavar="K", type=cli.count(0, MAX_INSTANCES - 1),
                        default=instance,
                        help="this instance's index, 0 to N-1: it runs workers K x W + 1 to"
                             " K x W + W (INSTANCE_INDEX)")
    parser.add_argument("--run-id", metavar="ID", default=run_id,
                        help=f"the shared run's name, required with --instances > 1: a random"
                             f" token of {RUN_ID_HEX_DIGITS}+ hex digits (a UUID), or any name"
                             f" with a secret in ${RUN_SECRET_ENV} (RUN_NAME)")
    parser.add_argument("--start-at", metavar="TIME", default=start_at, type=start_time,
                        help="start the schedule at TIME: ISO 8601 (UTC without a zone), or"
                             " +SECONDS from now (START_AT)")
    parser.add_argument("--processes", metavar="P", type=cli.count(1, MAX_PROCESSES),
                        default=processes,
                        help="run P instances of one run as child processes of this one,"
                             " and print one combined summary (NUM_PROCESSES)")


def start_time(text):
    """An argparse type: --start-at as ns since the epoch (ISO 8601, or +SECONDS from now)."""
    now = time.time()
    if text.startswith("+"):
        try:
            offset = float(text[1:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not +SECONDS") from None
        if not math.isfinite(offset) or not 0 <= offset <= START_AT_RANGE:
            raise argparse.ArgumentTypeError(f"{text}: +SECONDS is 0 to {START_AT_RANGE:g}")
        return int((now + offset) * 1e9)
    try:
        when = datetime.datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp()
    except (ValueError, OverflowError):  # OverflowError: a zone moves it out of range
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time"
                                         " (2026-12-07T03:00:00Z) or +SECONDS") from None
    if abs(seconds - now) > START_AT_RANGE:
        raise argparse.ArgumentTypeError(f"{text} is more than {START_AT_RANGE:g} s from now"
                                         " (is this host's clock right?)")
    return int(seconds * 1e9)


def iso_time(epoch_ns):
    """An epoch time in ns as the ISO 8601 text --start-at reads back to the same instant."""
    when = datetime.datetime.fromtimestamp(epoch_ns / 1e9, datetime.timezone.utc)
    return when.isoformat(timespec="microseconds")


def estimated_bits(text):
    """Bits of entropy in `text` by its characters' frequencies (length x Shannon entropy):
    an upper bound for a random string, far below it for a repetitive one."""
    counts = collections.Counter(text)
    return -sum(n * math.log2(n / len(text)) for n in counts.values())


def check_run_id(name, secret):
    """Why --run-id `name` cannot key a run's seal (None if it can). Without a secret it
    must be a random token: RUN_ID_HEX_DIGITS hex digits or more (dashes allowed), of
    MIN_SECRET_BITS estimated bits; with a secret, any printable name."""
    if not 1 <= len(name) <= RUN_ID_MAX_LENGTH or not RUN_ID_CHARACTERS.match(name):
        return f"is not 1 to {RUN_ID_MAX_LENGTH} printable characters without spaces"
    if secret is not None:
        return None
    digits = name.replace("-", "")
    if not re.fullmatch(r"[0-9a-fA-F]+", digits) or len(digits) < RUN_ID_HEX_DIGITS:
        return (f"is guessable: without a secret in ${RUN_SECRET_ENV}, give a random token of"
                f" {RUN_ID_HEX_DIGITS}+ hex digits (a UUID, a Job's UID, openssl rand -hex 16)")
    if estimated_bits(digits.lower()) < MIN_SECRET_BITS:
        return f"is too repetitive to be random (under {MIN_SECRET_BITS} bits)"
    return None


def shared_secret(environ):
    """The secret the instances share (RUN_SECRET_ENV), None if unset; ValueError if weak."""
    secret = environ.get(RUN_SECRET_ENV)
    if not secret:
        return None
    if estimated_bits(secret) < MIN_SECRET_BITS:
        raise ValueError(f"${RUN_SECRET_ENV} holds under {MIN_SECRET_BITS} bits by estimate:"
                         " use a random one (openssl rand -hex 16)")
    return secret


def wire_run_id(name, secret=None):
    """The 63-bit run id on the wire: BLAKE2b of the name, keyed by the secret if any."""
    key = hashlib.blake2b(secret.encode()).digest() if secret else b""
    digest = hashlib.blake2b(name.encode(), digest_size=8, key=key, person=RUN_ID_PERSON)
    return int.from_bytes(digest.digest(), "big") >> 1  # 63 bits, as a random run id has


def plan_from_args(parser, args, environ=os.environ):
    """The Plan the flags describe; exit 2 (parser.error) with a one-line reason if they
    do not make one."""
    if args.processes > 1 and (args.instances > 1 or args.instance):
        parser.error("--processes starts its own instances: give no --instances or"
                     " --instance with it")
    instances = max(args.instances, args.processes)
    if args.instance >= instances:
        parser.error(f"--instance {args.instance} is not 0 to {instances - 1}"
                     f" (--instances {args.instances})")
    if args.run_id is None:
        if args.instances > 1:
            parser.error("--instances > 1 needs --run-id: the same ID on every instance")
        return Plan(instances, args.instance, None, None, args.start_at, args.processes)
    if instances == 1:
        parser.error("--run-id names a run shared by several instances: give --instances"
                     " N > 1 (or --processes P > 1) with it")
    try:
        secret = shared_secret(environ)
    except ValueError as exc:
        parser.error(str(exc))
    reason = check_run_id(args.run_id, secret)
    if reason:
        parser.error(f"--run-id {args.run_id[:RUN_ID_MAX_LENGTH]!r} {reason}")
    return Plan(instances, args.instance, args.run_id, wire_run_id(args.run_id, secret),
                args.start_at, args.processes)


def start_clock(plan):
    """The run's schedule clock: at --start-at on every instance, else now."""
    if plan.start_ns is None:
        return schedule.Clock.now()
    # The same instant on both clocks: monotonic "now" plus how far away the start is.
    return schedule.Clock(time.monotonic() + (plan.start_ns - time.time_ns()) / 1e9,
                          plan.start_ns)


def wait_for_start(clock, pause):
    """A flood with --start-at: wait (with `pause`, which a stop cuts short) until the start."""
    ahead = clock.monotonic - time.monotonic()
    if ahead > 0:
        pause(ahead)


def describe(plan, workers):
    """The [START] line's words for this instance's place in the run ('' for a run of one)."""
    text = ""
    if plan.shared:
        first = plan.first_worker(workers)
        text += (f", instance {plan.instance} of {plan.instances} of run {plan.run_name!r}"
                 f" (workers {first + 1}-{first + workers} of {plan.run_workers(workers)})")
    if plan.start_ns is not None:
        text += f", starting at {iso_time(plan.start_ns)}"
    return text
