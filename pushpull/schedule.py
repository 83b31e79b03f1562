"""The sender's open-loop schedule: when each message is meant to leave (--rate, --delay).

Each message has an intended send time fixed at the start of the run, so a
worker that stalls does not push its later messages back: it sends at once to
catch up, and the receiver measures latency from the intended time (no
coordinated omission). How late each message left is the worker's send lag.
"""

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    """The run's start, read once on both clocks: intended times are offsets from it."""

    monotonic: float  # time.monotonic() at the start
    epoch_ns: int  # time.time_ns() at the same moment: what the wire carries

    @classmethod
    def now(cls):
        """The start clock of a run that starts now."""
        return cls(time.monotonic(), time.time_ns())


@dataclass(frozen=True)
class Schedule:
    """One worker's schedule: message k is due `phase + k * interval` s after the start."""

    clock: Clock
    interval: float  # seconds between this worker's messages
    phase: float  # seconds from the start to this worker's first message
    warmup: float  # seconds from the start whose messages stay out of latency figures

    def due(self, k):
        """Seconds after the start at which message k is meant to leave."""
        return self.phase + k * self.interval

    def intended_ns(self, due):
        """An offset from `due()` as the wall-clock time the wire carries."""
        return self.clock.epoch_ns + int(due * 1e9)

    def wait_until_due(self, k, pause):
        """Wait with `pause(seconds)` until message k is due; returns its intended time (ns,
        as the wire carries it), whether it is in the warmup, and how late it is (s).

        Open loop: a worker that is late sends at once, without waiting, until it
        has caught up.
        """
        due = self.due(k)
        late = time.monotonic() - self.clock.monotonic - due
        if late < 0:
            pause(-late)
            late = time.monotonic() - self.clock.monotonic - due
        return self.intended_ns(due), due < self.warmup, late


def worker_schedule(clock, number, workers, rate, delay, warmup):
    """Worker `number`'s schedule (1-based): None for a flood (no --rate, no --delay).

    --rate R is the total: each of W workers sends every W / R s, worker n
    offset by (n - 1) / R so the workers interleave evenly. --delay D alone: every
    worker sends at start + k x D, as the seed's workers do.
    """
    if rate:
        return Schedule(clock, workers / rate, (number - 1) / rate, warmup)
    if delay:
        return Schedule(clock, delay, 0.0, warmup)
    return None


def describe(rate, delay, warmup):
    """How a run is paced, for the [START] line: '' for a flood without a warmup."""
    text = ""
    if rate:
        text += f", {rate:g} msg/s in all (open loop)"
    elif delay:
        text += f", every {delay:g} s per worker"
    if warmup:
        text += f", {warmup:g} s warmup"
    return text


def messages_for_duration(duration, workers, rate, delay):
    """Messages per worker the schedule holds in `duration` s: the same for every worker.

    With --rate, rate x duration rounded to a multiple of the workers (the wire
    header carries one count per worker); with --delay, the times start + k x delay
    that fall before the end. 0 for a flood, which has no schedule to fill.
    """
    if rate:
        return round(rate * duration / workers)
    if delay:
        return math.ceil(duration / delay - 1e-9)
    return 0
