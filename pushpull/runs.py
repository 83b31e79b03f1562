"""Per-run statistics: each run's ledger and latency histograms, the [RUN] line and its JSON."""

import bisect
import collections
import itertools
import time

from pushpull import logs, wire
from pushpull.channel import TASK_BITS
from pushpull.latency import Histogram, ms_text
from pushpull.wire import END, KIND, RAW, RESENT, RUN, TASK, WORKER

MISSING_LISTED = 20  # a [RUN] line lists up to this many ranges of missing tasks
OPEN_RUNS_MAX = 1000  # runs whose per-task state is kept (open, or reported incomplete)
RUN_EVICT_IDLE = 2.0  # seconds: a run silent this long may give its state up to a new run;
# with every run kept heard from more recently, the new run is processed untracked
UNTRACKED_RUNS_REMEMBERED = 65536  # ids of runs processed untracked (refused a state, or
# dropped from the table), so a later message of one never starts its run anew from zero
RUNS_LISTED = 1000  # runs kept for the JSON summary; older finished ones are left out
RANGES_AHEAD_MAX = 10000  # ranges of tasks recorded beyond a missing one, per run
RANGES_AHEAD_TOTAL = 100000  # ... over all runs: about 10 MB (100 bytes a range)
LIST_WORKERS_MAX = 1024  # runs of at most this many workers keep next_task in a list (8 KB)
SENT_TIME_WINDOW = 3600  # seconds: a send time further than this from the receive time,
# either way, is clock skew (or a forged header): counted, and kept out of the latencies
SENT_TIME_WINDOW_NS = SENT_TIME_WINDOW * 1_000_000_000


class Arrivals:
    """When a run's batches arrived, and the bytes of its messages: its own rate, and the
    receive time its latencies are taken from. One attribute of its RunState: one more
    attribute made a freed RunState 800 bytes larger (its dict outgrew the shared keys;
    test_hostile's 30,000 runs went past their memory bound)."""

    __slots__ = ("first_ns", "last_ns", "current_ns", "bytes")

    def __init__(self):
        self.first_ns = None  # time.time_ns() of the batch that brought the first message
        self.last_ns = None  # ... and the last
        self.current_ns = None  # ... of the batch being recorded (None: a spill file's)
        self.bytes = 0  # of the messages recorded

    def recorded(self):
        """Messages of the batch being recorded were recorded: the run's span reaches it.
        An END frame's batch does not: the [RUN] line and the JSON give the same rate."""
        received_ns = self.current_ns
        if received_ns is not None:
            if self.first_ns is None:
                self.first_ns = received_ns
            self.last_ns = received_ns


class AheadBudget:
    """The ranges of tasks held beyond a missing one (TaskCoverage.ahead) over all runs."""

    __slots__ = ("used", "runs_over", "told")

    def __init__(self, told=None):
        self.used = 0  # ranges held
        self.runs_over = 0  # runs that met a bound (RANGES_AHEAD_MAX or _TOTAL)
        self.told = told  # told(info, ranges) once per run that meets a bound


class TaskCoverage:
    """Which tasks of one run were recorded (processed once each), and the missing ones as
    ranges.

    Its cost is proportional to what was received, never to what the header claims
    (beyond LIST_WORKERS_MAX workers): per-task state is kept only for workers and
    tasks seen. Tasks recorded beyond a missing one are kept as ranges of tasks, at most
    RANGES_AHEAD_MAX per run and RANGES_AHEAD_TOTAL over all runs (`budget`): a task
    that would need one more is processed and counted `untracked`. free() drops the
    per-task state and keeps the counts and the missing ranges.
    """

    def __init__(self, info, budget=None):
        self.info = info
        self.planned = info.planned
        # Per worker: every task below this one is recorded. A list indexed by worker is
        # 35 ns a message faster than a dict (7 % of the processor's hot path, bench
        # figure (2)), and our senders have at most 1000 workers (cli.MAX_WORKERS); a
        # run that claims more gets a dict of the workers seen.
        self.next_task = [0] * (info.workers + 1) if info.workers <= LIST_WORKERS_MAX else {}
        # worker -> ([starts], [ends]): the tasks recorded beyond a missing one, as sorted
        # ranges start <= task < end, neither touching the next.
        self.ahead = {}
        self.ranges = 0  # how many ranges `ahead` holds
        self.budget = budget or AheadBudget()  # ranges held over all runs
        self.received = 0  # tasks recorded: processed once each
        self.untracked = 0  # tasks processed unchecked: after free(), or past the bounds
        self.tracked = True  # per-task state kept (see free)
        self.missing_listed = []  # missing_ranges() as free() found them

    def is_new(self, worker, task):
        """True unless this task was recorded before."""
        try:
            expected = self.next_task[worker]
        except KeyError:
            expected = 0
        if task < expected:
            return False
        ahead = self.ahead.get(worker)
        if not ahead:
            return True
        starts, ends = ahead
        i = bisect.bisect_right(starts, task) - 1
        return i < 0 or task >= ends[i]

    def record(self, worker, task):
        """Mark one processed task recorded; False, and nothing changed, if it was before."""
        next_task = self.next_task
        try:
            expected = next_task[worker]
        except KeyError:  # a dict's first task of the worker (a try costs nothing otherwise)
            return self._record_new_worker(worker, task)
        if task == expected:
            expected += 1
            ahead = self.ahead.get(worker)
            if ahead and ahead[0][0] == expected:  # the gap before a range is filled
                expected = self._join_first(worker, ahead)
            next_task[worker] = expected
        elif task > expected:
            return self._record_ahead(worker, task)
        else:
            return False
        self.received += 1
        return True

    def _record_new_worker(self, worker, task):
        """record() of a worker's first task in a run of over LIST_WORKERS_MAX workers: its
        entry in next_task counts as one range (within the bounds)."""
        if task:
            return self._record_ahead(worker, task)
        if self.ranges >= RANGES_AHEAD_MAX or self.budget.used >= RANGES_AHEAD_TOTAL:
            return self._untracked_ahead()
        self.next_task[worker] = 0
        self.ranges += 1
        self.budget.used += 1
        return self.record(worker, task)

    def _join_first(self, worker, ahead):
        """The first range of `ahead` now follows the tasks recorded in order: merged into
        them; returns the new next task."""
        starts, ends = ahead
        expected = ends[0]
        del starts[0], ends[0]
        if not starts:
            del self.ahead[worker]
        self.ranges -= 1
        self.budget.used -= 1
        return expected

    def _record_ahead(self, worker, task):
        """record() of a task beyond a missing one: joined to a range, or a new range
        within the bounds, else counted untracked (processed, unchecked)."""
        ahead = self.ahead.get(worker)
        if ahead is None:
            ahead = ([], [])
        starts, ends = ahead
        i = bisect.bisect_right(starts, task) - 1
        if i >= 0 and task < ends[i]:
            return False  # recorded before
        if i >= 0 and ends[i] == task:  # extends range i
            ends[i] += 1
            if i + 1 < len(starts) and starts[i + 1] == ends[i]:  # and now touches the next
                ends[i] = ends[i + 1]
                del starts[i + 1], ends[i + 1]
                self.ranges -= 1
                self.budget.used -= 1
        elif i + 1 < len(starts) and starts[i + 1] == task + 1:  # extends the next one down
            starts[i + 1] = task
        elif self.ranges >= RANGES_AHEAD_MAX or self.budget.used >= RANGES_AHEAD_TOTAL:
            return self._untracked_ahead()
        else:
            starts.insert(i + 1, task)
            ends.insert(i + 1, task + 1)
            self.ahead[worker] = ahead
            self.ranges += 1
            self.budget.used += 1
        self.received += 1
        return True

    def _untracked_ahead(self):
        if not self.untracked:
            self.budget.runs_over += 1
            if self.budget.told is not None:
                self.budget.told(self.info, self.ranges)
        self.untracked += 1
        return True

    def record_untracked(self, worker, task):
        """record() once the per-task state is freed and the run incomplete: the task is
        processed but cannot be checked against the earlier ones."""
        self.untracked += 1
        return True

    def free(self):
        """Drop the per-task state, keep the counts. A complete run's later tasks are
        all duplicates; an incomplete run's are processed and counted `untracked`."""
        self.missing_listed = self.missing_ranges(MISSING_LISTED)
        self.budget.used -= self.ranges
        self.ranges = 0
        self.next_task = self.ahead = None
        self.tracked = False
        # Instance attributes in place of the methods: the hot loop calls them unchanged.
        if self.complete:
            self.is_new = self.record = _recorded_before
        else:
            self.is_new = _not_recorded
            self.record = self.record_untracked

    def missing_ranges(self, limit):
        """Up to `limit` ranges of tasks not recorded, in order, each as (first worker,
        last worker, first task, last task): workers never heard from make one range.
        Time proportional to the workers and the out-of-order tasks seen."""
        if not self.tracked:
            return self.missing_listed[:limit]
        per_worker, ranges, previous = self.info.messages_per_worker, [], 0
        if not per_worker:
            return ranges
        for worker in self._workers_seen():
            if worker > previous + 1:  # workers never heard from: all their tasks
                ranges.append((previous + 1, worker - 1, 0, per_worker - 1))
            ranges += self._worker_gaps(worker, per_worker)
            if len(ranges) >= limit:
                return ranges[:limit]
            previous = worker
        if previous < self.info.workers:
            ranges.append((previous + 1, self.info.workers, 0, per_worker - 1))
        return ranges[:limit]

    def _workers_seen(self):
        next_task = self.next_task
        seen = set(self.ahead)
        if isinstance(next_task, list):
            seen.update(worker for worker, task in enumerate(next_task) if task)
        else:
            seen.update(next_task)
        return sorted(seen)

    def _worker_gaps(self, worker, per_worker):
        try:
            start = self.next_task[worker]
        except KeyError:
            start = 0
        gaps = []
        starts, ends = self.ahead.get(worker, ((), ()))
        for first, end in zip(starts, ends):  # each above start, in order
            if first > start:
                gaps.append((worker, worker, start, first - 1))
            start = end
        if start < per_worker:
            gaps.append((worker, worker, start, per_worker - 1))
        return gaps

    @property
    def missing(self):
        """How many planned tasks were not recorded."""
        return self.planned - self.received

    @property
    def complete(self):
        """Every planned task was recorded."""
        return self.received >= self.planned


def _recorded_before(worker, task):
    """is_new() and record() of a freed complete run: every task was recorded before."""
    return False


def _not_recorded(worker, task):
    """is_new() of a freed incomplete run: nothing is known to have been recorded."""
    return True


class RunState:
    """What the receiver knows of one sender run: its tasks (a TaskCoverage), what else
    befell them (duplicates, resends, the spill file, END frames), when they arrived and
    their latencies; its entry in the JSON summary."""

    def __init__(self, info, now, budget=None):
        self.info = info
        self.tasks = TaskCoverage(info, budget)  # which tasks were recorded, and the missing ones
        self.duplicates = 0
        self.resent = 0  # tasks marked as resends by a --confirm sender
        self.spilled = 0  # tasks saved to the spill file by a cold stop
        self.clock_skew = 0  # tasks whose send time is outside SENT_TIME_WINDOW
        self.ends = {}  # worker -> tasks it says it sent (its first END frame)
        # Latency from the intended send time, and from the actual one: the same
        # histogram for a run without a schedule, where the two times are equal.
        self.latency = Histogram()
        self.latency_raw = Histogram() if info.scheduled else self.latency
        # Intended (and actual) send times of recorded tasks not yet in the histograms,
        # and when their batch was received (None for a spill file's): the histograms
        # take them once per batch.
        self.unrecorded = []
        self.unrecorded_raw = []
        self.arrivals = Arrivals()  # unrecorded_received_ns, and the run's own rate
        self.last_seen = now
        self.closed = False  # reported in a [RUN] line

    @property
    def unrecorded_received_ns(self):
        """When the batch of the unrecorded send times arrived (None: a spill file's)."""
        return self.arrivals.current_ns

    @unrecorded_received_ns.setter
    def unrecorded_received_ns(self, received_ns):
        self.arrivals.current_ns = received_ns

    def record_times(self, sent_ns, intended_ns, resent):
        """Keep a recorded task's send times for the latency histograms; count a resend."""
        if intended_ns is not None:  # None: a message of the sender's --warmup
            self.unrecorded.append(intended_ns)
            if self.info.scheduled:
                self.unrecorded_raw.append(sent_ns)
        if resent:
            self.resent += 1

    def record_latencies(self):
        """Move the unrecorded send times into the latency histograms; returns how many
        were left out as clock skew (judged by the intended send time)."""
        received_ns, skewed = self.unrecorded_received_ns, 0
        if self.unrecorded and received_ns:
            skewed = self.latency.add_batch(received_ns, self.unrecorded, SENT_TIME_WINDOW_NS)
            if self.unrecorded_raw:
                self.latency_raw.add_batch(received_ns, self.unrecorded_raw,
                                           SENT_TIME_WINDOW_NS)
            self.clock_skew += skewed
        self.unrecorded = []
        self.unrecorded_raw = []
        return skewed

    def rates(self):
        """(msg/s, MB/s) from the run's first message to its last; None for both when they
        came together, or from a spill file (no receive time)."""
        first, last = self.arrivals.first_ns, self.arrivals.last_ns
        if first is None or last <= first:
            return None, None
        seconds = (last - first) / 1e9
        return (round(self.tasks.received / seconds, 1),
                round(self.arrivals.bytes / 1e6 / seconds, 3))

    @property
    def finished(self):
        """Every task was recorded, or every worker sent its END frame."""
        return self.tasks.complete or len(self.ends) >= self.info.workers

    def to_json(self):
        """The run's entry in the JSON summary."""
        tasks, one_receiver = self.tasks, self.info.endpoints == 1
        listed = tasks.missing_ranges(MISSING_LISTED)
        sent = sum(self.ends.values()) if len(self.ends) >= self.info.workers else None
        return {
            "run_id": wire.run_label(self.info.run_id),
            "workers": self.info.workers,
            "planned": tasks.planned,
            "sent_reported": sent,
            "received": tasks.received,
            "missing": tasks.missing if one_receiver else None,
            "missing_tasks": [range_text(r) for r in listed] if one_receiver else [],
            "duplicates": self.duplicates,
            "spilled": self.spilled,
            "resent": self.resent,
            "clock_skew": self.clock_skew,
            "untracked": tasks.untracked,
            "confirm": self.info.confirm,
            "endpoints": self.info.endpoints,
            "complete": tasks.complete,
            "rate_msg_s": self.rates()[0],
            "rate_mb_s": self.rates()[1],
            "latency_ms": self.latency.summary_ms(),
            "latency_raw_ms": self.latency_raw.summary_ms(),
            "latency_samples": self.latency.count,
        }


def range_text(missing_range):
    """One range of missing_ranges() as text: Pusher-3:7, Pusher-3:7-9, Pusher-4..6:0-99."""
    first_worker, last_worker, first_task, last_task = missing_range
    workers = f"{first_worker}" if first_worker == last_worker else \
        f"{first_worker}..{last_worker}"
    tasks = f"{first_task}" if first_task == last_task else f"{first_task}-{last_task}"
    return f"Pusher-{workers}:{tasks}"


def range_size(missing_range):
    """How many tasks one range of missing_ranges() holds."""
    first_worker, last_worker, first_task, last_task = missing_range
    return (last_worker - first_worker + 1) * (last_task - first_task + 1)


class RunTable:
    """The runs a receiver keeps, and each one's lifecycle in it, within two bounds.

    Writes counters.clock_skew.

    A run is open until it completes, its sender finishes or falls silent, or the
    receiver stops; then close() reports it in its [RUN] line. A complete run is then
    freed (summary only). An incomplete one keeps its per-task state ("unhealed"), so
    data that arrives later (after a network cut heals) is still checked, and a run that
    completes after all gets a second [RUN] line, then is freed. At most OPEN_RUNS_MAX
    runs keep per-task state. A new run past that takes the place of the run heard from
    least recently (an unhealed one first), if that one has been silent RUN_EVICT_IDLE
    seconds: an unhealed run is freed, an open one closed early (its [RUN] line says
    so). Otherwise the new run is refused: its messages are processed and counted
    `untracked`, and a run that is receiving is never reset or freed. At most
    RUNS_LISTED runs are kept for the JSON; past that the oldest freed run is dropped
    and counted in left_out (its later messages are untracked too). Every step is
    constant time: `open` and `unhealed` are kept in the order their runs were last
    heard from (touch()).
    """

    def __init__(self, counters, log, warnings):
        self.counters = counters
        self.log = log
        self.warnings = warnings  # a logs.RateLimitedLog
        self.runs = {}  # run id -> RunState: every run kept, in the order first seen
        self.open = collections.OrderedDict()  # run id -> RunState not reported yet
        self.unhealed = collections.OrderedDict()  # reported incomplete, per-task state kept
        self.freed = collections.OrderedDict()  # summary only, in the order freed
        self.left_out = 0  # runs dropped from `runs` (RUNS_LISTED)
        # Run ids whose messages are processed untracked (no RunState), oldest first.
        self.untracked_runs = collections.OrderedDict()
        self.refused = 0  # runs refused a state (OPEN_RUNS_MAX, none idle)
        self.untracked = 0  # messages processed in runs without a state
        self.ahead_budget = AheadBudget(self._over_ranges)  # tasks held out of order
        # The latency of the runs dropped, kept for the lifetime figures (latency()).
        self.left_out_latency = Histogram()
        self.left_out_latency_raw = Histogram()
        # Where a closed run's report goes: the processor's channel.ConfirmPublisher,
        # while its socket is open (None: the report is only logged).
        self.reports = None

    def new_run(self, info, now):
        """Start a run's state, within OPEN_RUNS_MAX and RUNS_LISTED; None when the run
        is processed untracked (refused now or before, or dropped from the table)."""
        reused = self.runs.get(info.run_id)
        if reused is not None:  # decode() forgot the run (RUNS_REMEMBERED) and saw it anew
            self._drop(reused, "its run id came back with other run fields", remember=False)
        elif info.run_id in self.untracked_runs:
            return None
        if len(self.open) + len(self.unhealed) >= OPEN_RUNS_MAX and not self._make_room(now):
            self._refuse(info)
            return None
        run = self.runs[info.run_id] = self.open[info.run_id] = RunState(info, now, self.ahead_budget)
        while len(self.runs) > RUNS_LISTED and self.freed:
            self._drop(next(iter(self.freed.values())), None)
        return run

    def touch(self, run):
        """A run is heard from: last in the order of eviction (once per stretch)."""
        if not run.closed:
            self.open.move_to_end(run.info.run_id)
        elif run.tasks.tracked:
            self.unhealed.move_to_end(run.info.run_id)

    def _make_room(self, now):
        """Free the unhealed run, or else close early the open run, heard from least
        recently, if it has been silent RUN_EVICT_IDLE seconds; False if neither has."""
        for table in (self.unhealed, self.open):
            if not table:
                continue
            run = next(iter(table.values()))
            if now - run.last_seen < RUN_EVICT_IDLE:
                continue
            label = wire.run_label(run.info.run_id)
            if table is self.unhealed:
                self.unhealed.popitem(last=False)
                self._free(run)
                self.warnings.warning("untracked", f"[RUN] run {label}: over {OPEN_RUNS_MAX}"
                                      " runs tracked, its task state is freed; tasks"
                                      " arriving later are processed unchecked")
            else:
                self.close(run, f"closed early: over {OPEN_RUNS_MAX} runs open", early=True)
                self.unhealed.pop(run.info.run_id)
                self._free(run)
            return True
        return False

    def _refuse(self, info):
        """No room for a new run: its messages are processed untracked."""
        self.refused += 1
        self._remember_untracked(info.run_id)
        self.warnings.warning("refused", f"[RUN] run {wire.run_label(info.run_id)}: over"
                              f" {OPEN_RUNS_MAX} runs tracked, none silent for"
                              f" {RUN_EVICT_IDLE:g} s: its messages are processed untracked"
                              f" (runs refused so far: {self.refused})")

    def _over_ranges(self, info, ranges):
        """A run's task beyond a missing one found no room: it and the like are untracked."""
        bound = (f"{RANGES_AHEAD_MAX} ranges of tasks out of order" if ranges
                 >= RANGES_AHEAD_MAX else f"{RANGES_AHEAD_TOTAL} such ranges over all runs")
        self.warnings.warning("ahead", f"[RUN] run {wire.run_label(info.run_id)}: over {bound};"
                              " its tasks beyond a missing one are processed untracked"
                              " (not checked for duplicates)")

    def _remember_untracked(self, run_id):
        if len(self.untracked_runs) >= UNTRACKED_RUNS_REMEMBERED:
            self.untracked_runs.popitem(last=False)
        self.untracked_runs[run_id] = None

    def _drop(self, run, reason, remember=True):
        """Forget a run altogether (counted in left_out); report it first if it is open.
        remember: its later messages are processed untracked."""
        if reason and not run.closed:
            self.close(run, reason)
        run_id = run.info.run_id
        if remember:
            self._remember_untracked(run_id)
        for table in (self.runs, self.open, self.unhealed, self.freed):
            table.pop(run_id, None)
        self.left_out += 1
        self.left_out_latency.merge(run.latency)
        self.left_out_latency_raw.merge(run.latency_raw)

    def _free(self, run):
        self.record_latencies(run)
        run.tasks.free()
        self.freed[run.info.run_id] = run

    def record_latencies(self, run):
        """Move a run's send times into its latency histograms, counting the clock skew."""
        self.counters.clock_skew += run.record_latencies()

    def close(self, run, reason, early=False):
        """Report a run in its [RUN] line (a warning when tasks are missing), then free it
        if it is complete; an incomplete run keeps its per-task state (unhealed).

        early: a run closed to make room, reported rate-limited (a flood of runs)."""
        self.record_latencies(run)  # the [RUN] line shows them
        run.closed = True
        run_id = run.info.run_id
        self.open.pop(run_id, None)
        if run.tasks.complete:
            self.unhealed.pop(run_id, None)
            self._free(run)
        else:
            self.unhealed[run_id] = run
        line = run_line(run, reason)
        if early:  # a flood of runs: their [RUN] lines alone, rate-limited
            self.warnings.warning("early", line[0])
        elif run.tasks.complete or run.info.endpoints > 1:
            self.log.info(line)
        else:
            self.log.warning(line)
        if self.reports is not None:  # again when a run reported incomplete completes
            self.reports.report(run_id, run.to_json())

    def report_silent(self, timeout):
        """Report every open run whose sender has said nothing for `timeout` seconds."""
        now = time.monotonic()
        while self.open:  # heard from least recently first (touch())
            run = next(iter(self.open.values()))
            if now - run.last_seen < timeout:
                return
            self.close(run, f"sender silent for {timeout:g} s")

    def report_open(self):
        """At shutdown: report every run not yet reported."""
        for run in list(self.open.values()):
            self.close(run, "still open at shutdown")

    def count_spilled(self, spilled):
        """Charge the tasks saved to the spill file to their runs (`spilled`: RunInfo ->
        count), a run none of whose tasks was processed included."""
        now = time.monotonic()
        for info, count in spilled.items():
            run = self.runs.get(info.run_id) or self.new_run(info, now)
            if run is not None:  # else untracked: only in counters.spilled
                run.spilled += count

    def to_json(self):
        """The entries of the runs kept (at most RUNS_LISTED) for the JSON summary, each with
        its latency buckets (pushpull.merge); never in a report, which must stay small."""
        return [{**run.to_json(), "latency_buckets": run.latency.buckets()}
                for run in self.runs.values()]

    def latency(self, raw=False):
        """Every run's latency (raw: from the actual send time) merged in one histogram,
        the runs left out included."""
        merged = Histogram()
        merged.merge(self.left_out_latency_raw if raw else self.left_out_latency)
        for run in list(self.runs.values()):  # list: the processor may add a run meanwhile
            merged.merge(run.latency_raw if raw else run.latency)
        return merged


class RunLedger:
    """Accounts each processed message to its sender run in `table` (a RunTable), which
    reports the run once it is complete or its sender finished.

    Writes counters.processed, .duplicates and .plain.
    """

    def __init__(self, counters, table, warnings):
        self.counters = counters
        self.table = table
        self.warnings = warnings  # a logs.RateLimitedLog
        # The batch worked message by message (begin() ... end()): its current stretch's
        # run (None: in no run), the RunInfo it is for, the clock, the receive time.
        self._current = self._current_info = None
        self._now = 0.0
        self._received_ns = None

    def record_batch(self, messages, received_ns, confirms):
        """The fast path, for a batch with no work to do per message: END frames and
        duplicates only counted, the others recorded in their runs (tasks of --confirm
        runs also go to `confirms`, a channel.ConfirmPublisher). Returns how many were
        taken: all."""
        # The processor's hot path (bench/README.md, figure (2)): a run's state is looked
        # up once per stretch of its messages; an open run's DATA messages go through
        # _record_stretch(), which counts them once per stretch.
        now = time.monotonic()
        last_info = run = None
        index, count = 0, len(messages)
        while index < count:
            msg = messages[index]
            _, info, kind, worker, task, _, resent, _, _, _ = msg
            if info is not last_info:
                last_info, run = info, self._next_run(run, info, now, received_ns)
            index += 1
            if run is None:  # plain text, or a run without state: in no run
                if info is None or kind != END:  # a run without state's END: bookkeeping
                    self._count_untracked(msg, confirms)
                continue
            run.last_seen = now
            if kind == END:
                self._end(run, worker, task)
            elif not run.closed:
                index = self._record_stretch(run, messages, index - 1, confirms)
            else:
                if not resent:
                    self._late(run)
                self._record(run, msg, confirms, publish=False)
        if run is not None:
            self.table.record_latencies(run)
        return count

    # The slow path, taken one message at a time when each has work to do (the receiver
    # script's ProcessorThread.work_each): begin(); for each message admit(), the work,
    # record(); end().
    def begin(self, received_ns):
        """Start a batch worked message by message; `received_ns` is its receive time."""
        self._now = time.monotonic()
        self._current_info = self._current = None
        self._received_ns = received_ns

    def admit(self, msg, confirms):
        """Whether `msg` is to be worked: False for an END frame (counted as bookkeeping)
        and for a task processed before (a duplicate: counted, dropped)."""
        info = msg[RUN]
        if info is not self._current_info:
            self._current_info = info
            self._current = self._next_run(self._current, info, self._now, self._received_ns)
        run = self._current
        if run is None:  # plain text, or a run without state: in no run
            return info is None or msg[KIND] != END
        run.last_seen = self._now
        if msg[KIND] == END:
            self._end(run, msg[WORKER], msg[TASK])
            return False
        if run.closed and not msg[RESENT]:
            self._late(run)
        if not run.tasks.is_new(msg[WORKER], msg[TASK]):
            self._duplicate(run, msg, confirms)  # not worked again
            return False
        return True

    def record(self, msg, confirms):
        """`msg`, admitted, has had its work done: record it in its run (a --confirm
        run's task confirmed as soon as due)."""
        run = self._current
        if run is None:
            self._count_untracked(msg, confirms)
            return
        self._now = run.last_seen = time.monotonic()
        self._record(run, msg, confirms, publish=True)

    def end(self):
        """The batch is done: the latencies of its last run recorded."""
        if self._current is not None:
            self.table.record_latencies(self._current)

    def _record(self, run, msg, confirms, publish):
        """Record one DATA message in its run (a duplicate: counted, dropped); with
        `publish`, its confirmation goes out if one is due."""
        _, info, _, worker, task, sent_ns, resent, _, _, intended_ns = msg
        tasks = run.tasks
        if not tasks.record(worker, task):  # admit() checked; record_batch() did not
            self._duplicate(run, msg, confirms)
            return
        run.record_times(sent_ns, intended_ns, resent)
        self.counters.processed += 1
        run.arrivals.recorded()
        run.arrivals.bytes += len(msg[RAW])
        if info.confirm:
            confirms.add(info.run_id, worker, task)
            if publish:
                confirms.publish_if_due()  # each confirmed as its work is done
        if tasks.received >= tasks.planned:  # a freed complete run never gets here again
            self._complete(run)

    def _record_stretch(self, run, messages, start, confirms):
        """Record the DATA messages of `run` (open, no work to do) from messages[start]
        on, until a message of another run, an END frame, or the run completes; returns
        the index of the first message not taken.

        What record_batch() does for each message, with the counts (processed, bytes,
        resends, the tasks to confirm) added once per stretch and the lookups made
        once: the flood's hot path. With the latencies (Histogram.add_batch), 0.52 µs
        of CPU a message through a per-message loop, 0.31 µs here (bench/README.md,
        "Profiles", issue 22).
        """
        info, tasks = run.info, run.tasks
        record, stamp = tasks.record, run.unrecorded.append
        raw = run.unrecorded_raw.append if info.scheduled else None
        confirmed = [] if info.confirm else None  # their task keys, for confirms.add_keys()
        left = tasks.planned - tasks.received  # recorded tasks that complete the run
        recorded = nbytes = resent_count = 0
        index = start
        for msg in itertools.islice(messages, start, None):
            frame, msg_info, kind, worker, task, sent_ns, resent, _, _, intended_ns = msg
            if msg_info is not info or kind:
                break
            index += 1
            if not record(worker, task):
                self._duplicate(run, msg, confirms)
                continue
            if intended_ns is not None:  # None: a message of the sender's --warmup
                stamp(intended_ns)
                if raw is not None:
                    raw(sent_ns)
            if resent:
                resent_count += 1
            nbytes += len(frame)
            if confirmed is not None:
                confirmed.append(worker << TASK_BITS | task)
            recorded += 1
            if recorded >= left:
                break
        self.counters.processed += recorded
        if recorded:
            run.arrivals.recorded()
        run.arrivals.bytes += nbytes
        run.resent += resent_count
        if confirmed:
            confirms.add_keys(info.run_id, confirmed)
        if recorded and tasks.received >= tasks.planned:
            self._complete(run)
        return index

    def _next_run(self, run, info, now, received_ns):
        """A new stretch of messages: the last run's latencies recorded; the state of the
        new stretch's run (None: plain text, in no run)."""
        if run is not None:
            self.table.record_latencies(run)
        return None if info is None else self._run(info, now, received_ns)

    def _count_untracked(self, msg, confirms):
        """A message in no run (plain text, or a run without state: untracked), processed:
        counted."""
        info = msg[RUN]
        self.counters.processed += 1
        if info is None:
            self.counters.plain += 1
            return
        self.table.untracked += 1
        if info.confirm:  # processed: its sender need not send it again
            confirms.add(info.run_id, msg[WORKER], msg[TASK])

    def _complete(self, run):
        """Every planned task is recorded: its [RUN] line (a second one if it was reported
        incomplete before)."""
        self.table.close(run, "complete" if not run.closed else
                         "complete after all (reported incomplete before)")

    def _run(self, info, now, received_ns):
        run = self.table.runs.get(info.run_id)
        if run is None or (run.info is not info and run.info != info):
            run = self.table.new_run(info, now)
            if run is None:  # untracked
                return None
        else:
            self.table.touch(run)
        run.unrecorded_received_ns = received_ns
        return run

    def _end(self, run, worker, sent):
        if worker in run.ends:  # counts once: a second END cannot change sent_reported
            if run.ends[worker] == sent:
                return  # a copy: a sender with several receivers repeats each END
            self.warnings.warning("end", f"[RUN] run {wire.run_label(run.info.run_id)}:"
                                         f" Pusher-{worker} sent a second END frame; ignored")
            return
        run.ends[worker] = sent
        if run.finished and not run.closed:
            self.table.close(run, "complete" if run.tasks.complete else "sender finished")

    def _late(self, run):
        self.warnings.warning("late", f"[RUN] run {wire.run_label(run.info.run_id)}: a message"
                                      " arrived after the run was reported")

    def _duplicate(self, run, msg, confirms):
        """A task processed before in this receiver's lifetime: dropped, not worked again."""
        self.counters.duplicates += 1
        run.duplicates += 1
        worker, task = msg[WORKER], msg[TASK]
        if run.info.confirm:
            # Its confirmation may have been lost: confirm it again.
            confirms.add(run.info.run_id, worker, task)
        self.warnings.warning("dup", f"[DUP] run {wire.run_label(run.info.run_id)}"
                                     f" {logs.shown(wire.client_name(msg))} task {task} arrived"
                                     " again; dropped")


def run_line(run, reason):
    """The [RUN] report of a finished (or silent) sender run: a logs.LineBlock, its counts
    on the [RUN] line, its latency and its missing tasks on continuation lines."""
    info, tasks = run.info, run.tasks
    lat = run.latency.summary_ms()
    listed = []  # the missing tasks' ranges shown
    if info.endpoints == 1:
        missing = tasks.missing
        ranges = tasks.missing_ranges(MISSING_LISTED) if missing else []
        listed = [range_text(r) for r in ranges]
        not_shown = missing - sum(range_size(r) for r in ranges)
        if listed and not_shown > 0:
            listed.append(f"... +{not_shown}")
        # Processed unchecked (untracked): some of the missing may be among them.
        at_most = "at most " if tasks.untracked and missing else ""
        missing_text = f"missing {at_most}{missing}"
        if run.spilled:
            missing_text += f", {run.spilled} of them in the spill file"
        received = f"received {tasks.received}/{tasks.planned}"
    else:
        missing_text = f"share of {info.endpoints} receivers"
        received = f"received {tasks.received} of {tasks.planned} planned"
    resent = f" | resent {run.resent}" if info.confirm else ""
    if tasks.untracked:
        resent += f" | untracked {tasks.untracked}"
    if run.clock_skew:
        resent += f" | clock skew {run.clock_skew}"
    msg_s, mb_s = run.rates()
    rate = f"{msg_s:.1f} msg/s {mb_s:.3f} MB/s" if msg_s is not None else "n/a (one batch)"
    raw = run.latency_raw.summary_ms()
    raw_text = (f" (raw p99 {ms_text(raw['p99'])} max {ms_text(raw['max'])})"
                if info.scheduled else "")
    head = (f"[RUN] run {wire.run_label(info.run_id)} | {received} | {missing_text}"
            f" | duplicates {run.duplicates}{resent} | {reason}")
    block = logs.continued(head, [f"rate {rate}",
                                  f"latency p50 {ms_text(lat['p50'])} p99 {ms_text(lat['p99'])}"
                                  f" p99.9 {ms_text(lat['p99_9'])} max {ms_text(lat['max'])}"
                                  f"{raw_text}"])
    if listed:
        block.extend(logs.continued("", listed, "missing: ", ", ")[1:])
    return block


SPILLED_BECAUSE = {"cold": "cold stop", "failed": "a thread failed", "warm": "its write"
                   " failed"}  # the receiver's stop -> why a run's row counts spilled tasks


def run_row(entry, stop=None):
    """The summary table's row (label, text) for a run's JSON entry (RunState.to_json);
    `stop`: the receiver's stop ("warm", "cold", "failed"), said with spilled tasks."""
    lat = entry["latency_ms"]
    missing = "n/a (several receivers)" if entry["missing"] is None else entry["missing"]
    rate = "rate n/a" if entry["rate_msg_s"] is None else f"{entry['rate_msg_s']:.1f} msg/s"
    spilled = (f", {entry['spilled']} in the spill file ({SPILLED_BECAUSE.get(stop, stop)})"
               if entry["spilled"] else "")
    return (f"run {entry['run_id']}",
            f"{entry['received']}/{entry['planned']} received, missing {missing}{spilled},"
            f" duplicates {entry['duplicates']}, {rate},"
            f" p50 {ms_text(lat['p50'])}, p99 {ms_text(lat['p99'])},"
            f" p99.9 {ms_text(lat['p99_9'])}, max {ms_text(lat['max'])}")
