"""Per-run statistics: each run's ledger and latency histograms, the [RUN] line and its JSON."""

import time

from pushpull import wire
from pushpull.latency import Histogram
from pushpull.wire import DATA, END, KIND, RUN, TASK, WORKER

MISSING_LISTED = 20  # a [RUN] line lists missing task numbers up to this many


class RunState:
    """What the receiver knows of one sender run: which tasks were processed, and how fast."""

    def __init__(self, info, now):
        self.info = info
        self.planned = info.planned
        self.next_task = [0] * (info.workers + 1)  # per worker: every task below is recorded
        self.ahead = {}  # worker -> tasks recorded beyond a missing one
        self.received = 0  # tasks recorded: processed once each
        self.duplicates = 0
        self.resent = 0  # tasks marked as resends by a --confirm sender
        self.spilled = 0  # tasks saved to the spill file by a cold stop
        self.ends = {}  # worker -> tasks it says it sent (END frame)
        # Latency from the intended send time, and from the actual one: the same
        # histogram for a run without a schedule, where the two times are equal.
        self.latency = Histogram()
        self.latency_raw = Histogram() if info.scheduled else self.latency
        # Intended (and actual) send times of recorded tasks not yet in the histograms,
        # and when their batch was received (None for a spill file's): the histograms
        # take them once per batch.
        self.unrecorded = []
        self.unrecorded_raw = []
        self.unrecorded_received_ns = None
        self.last_seen = now
        self.closed = False

    def is_new(self, worker, task):
        """True unless this task was recorded before."""
        return task >= self.next_task[worker] and task not in self.ahead.get(worker, ())

    def record(self, worker, task, sent_ns, intended_ns, resent):
        """Account one processed task; False, and nothing changed, if it was recorded before."""
        expected = self.next_task[worker]
        if task == expected:
            expected += 1
            ahead = self.ahead.get(worker)
            if ahead:
                while expected in ahead:
                    ahead.remove(expected)
                    expected += 1
            self.next_task[worker] = expected
        elif task > expected:
            ahead = self.ahead.setdefault(worker, set())
            if task in ahead:
                return False
            ahead.add(task)
        else:
            return False
        self.received += 1
        if intended_ns is not None:  # None: a message of the sender's --warmup
            self.unrecorded.append(intended_ns)
            if self.info.scheduled:
                self.unrecorded_raw.append(sent_ns)
        if resent:
            self.resent += 1
        return True

    def record_latencies(self):
        """Move the unrecorded send times into the latency histograms."""
        if self.unrecorded and self.unrecorded_received_ns:
            self.latency.add_batch(self.unrecorded_received_ns, self.unrecorded)
            if self.unrecorded_raw:
                self.latency_raw.add_batch(self.unrecorded_received_ns, self.unrecorded_raw)
        self.unrecorded = []
        self.unrecorded_raw = []

    def missing_tasks(self, limit):
        """Up to `limit` (worker, task) pairs that have not arrived, and their count."""
        listed, count = [], 0
        per_worker = self.info.messages_per_worker
        for worker in range(1, self.info.workers + 1):
            ahead = self.ahead.get(worker, ())
            for task in range(self.next_task[worker], per_worker):
                if task not in ahead:
                    count += 1
                    if len(listed) < limit:
                        listed.append((worker, task))
        return listed, count

    @property
    def complete(self):
        """Every planned task was recorded."""
        return self.received >= self.planned

    @property
    def finished(self):
        """Every task was recorded, or every worker sent its END frame."""
        return self.complete or len(self.ends) >= self.info.workers

    def to_json(self):
        """The run's entry in the JSON summary."""
        one_receiver = self.info.endpoints == 1
        listed, missing = self.missing_tasks(MISSING_LISTED)
        sent = sum(self.ends.values()) if len(self.ends) >= self.info.workers else None
        return {
            "run_id": wire.run_label(self.info.run_id),
            "workers": self.info.workers,
            "planned": self.planned,
            "sent_reported": sent,
            "received": self.received,
            "missing": missing if one_receiver else None,
            "missing_tasks": [f"Pusher-{w}:{t}" for w, t in listed] if one_receiver else [],
            "duplicates": self.duplicates,
            "spilled": self.spilled,
            "resent": self.resent,
            "confirm": self.info.confirm,
            "endpoints": self.info.endpoints,
            "complete": self.complete,
            "latency_ms": self.latency.summary_ms(),
            "latency_raw_ms": self.latency_raw.summary_ms(),
            "latency_samples": self.latency.count,
        }


class RunLedger:
    """Accounts each processed message to its sender run, and reports each run once.

    Writes counters.processed, .duplicates and .plain.
    """

    def __init__(self, counters, log, warnings):
        self.counters = counters
        self.log = log
        self.warnings = warnings  # a logs.RateLimitedLog
        self.runs = {}  # run id -> RunState
        # Where a closed run's report goes: the processor's confirm.ConfirmPublisher,
        # while its socket is open (None: the report is only logged).
        self.reports = None

    def process(self, messages, received_ns, work, confirms):
        """Take a batch's messages in order: END frames and duplicates are only counted;
        the others get work(msg) (None: nothing to do), then are recorded (tasks of
        --confirm runs also go to `confirms`, a confirm.ConfirmPublisher). Returns how
        many were taken: fewer when work() returned False (a cold stop)."""
        # The processor's hot path (bench/README.md, figure (2): the receiver spends
        # about 1.6 µs of CPU per message in all): a run's state is looked up once per
        # stretch of its messages, and without work record() is the duplicate check
        # too, one call per message (an is_new() call before it cost 0.06 µs more).
        counters = self.counters
        now = time.monotonic()
        last_info = run = None
        for index, msg in enumerate(messages):
            _, info, kind, worker, task, sent_ns, resent, _, _, intended_ns = msg
            if info is not last_info:
                if run is not None:
                    run.record_latencies()
                last_info = info
                run = None if info is None else self._run(info, now, received_ns)
            if run is None:  # plain text: in no run
                if work is not None and not work(msg):
                    return index
                counters.processed += 1
                counters.plain += 1
                continue
            run.last_seen = now
            if kind == END:
                self._end(run, worker, task)
                continue
            if run.closed and not resent:
                self._late(run)
            if work is not None:
                if not run.is_new(worker, task):
                    self._duplicate(run, msg, confirms)  # not worked again
                    continue
                if not work(msg):
                    return index
                now = run.last_seen = time.monotonic()
            # Without work, record() is the duplicate check too: one call per message.
            if not run.record(worker, task, sent_ns, intended_ns, resent):
                self._duplicate(run, msg, confirms)
                continue
            counters.processed += 1
            if info.confirm:
                confirms.add(info.run_id, worker, task)
                if work is not None:
                    confirms.publish_if_due()  # each confirmed as its work is done
            if run.received >= run.planned and not run.closed:
                self.close(run, "complete")
        if run is not None:
            run.record_latencies()
        return len(messages)

    def _run(self, info, now, received_ns):
        run = self.runs.get(info.run_id)
        if run is None:
            run = self.runs[info.run_id] = RunState(info, now)
        run.unrecorded_received_ns = received_ns
        return run

    def _end(self, run, worker, sent):
        run.ends[worker] = sent
        if run.finished and not run.closed:
            self.close(run, "complete" if run.complete else "sender finished")

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
                                     f" {wire.client_name(msg)} task {task} arrived again;"
                                     " dropped")

    def close(self, run, reason):
        """Report a run in its [RUN] line; a warning when tasks are missing."""
        run.record_latencies()  # the [RUN] line shows them
        run.closed = True
        level = self.log.info if run.complete or run.info.endpoints > 1 else self.log.warning
        level(run_line(run, reason))
        if self.reports is not None:
            self.reports.report(run.info.run_id, run.to_json())

    def report_silent(self, timeout):
        """Report every open run whose sender has said nothing for `timeout` seconds."""
        now = time.monotonic()
        for run in self.runs.values():
            if not run.closed and now - run.last_seen >= timeout:
                self.close(run, f"sender silent for {timeout:g} s")

    def report_open(self):
        """At shutdown: report every run not yet reported."""
        for run in self.runs.values():
            if not run.closed:
                self.close(run, "still open at shutdown")

    def count_spilled(self, messages):
        """Charge each DATA message saved to the spill file to its run."""
        for msg in messages:
            info = msg[RUN]
            if info is not None and msg[KIND] == DATA and info.run_id in self.runs:
                self.runs[info.run_id].spilled += 1

    def to_json(self):
        """Every run's entry in the JSON summary."""
        return [run.to_json() for run in self.runs.values()]

    def latency(self, raw=False):
        """Every run's latency (raw: from the actual send time) merged in one histogram."""
        merged = Histogram()
        for run in list(self.runs.values()):  # list: the processor may add a run meanwhile
            merged.merge(run.latency_raw if raw else run.latency)
        return merged


def run_line(run, reason):
    """The one [RUN] line that reports a finished (or silent) sender run."""
    info = run.info
    lat = run.latency.summary_ms()
    if info.endpoints == 1:
        listed, missing = run.missing_tasks(MISSING_LISTED)
        shown = ", ".join(f"Pusher-{w}:{t}" for w, t in listed)
        more = f" ... +{missing - len(listed)}" if missing > len(listed) else ""
        missing_text = f"missing {missing}" + (f" ({shown}{more})" if missing else "")
        if run.spilled:
            missing_text += f", {run.spilled} of them in the spill file"
        received = f"received {run.received}/{run.planned}"
    else:
        missing_text = f"share of {info.endpoints} receivers"
        received = f"received {run.received} of {run.planned} planned"
    resent = f" | resent {run.resent}" if info.confirm else ""
    raw = run.latency_raw.summary_ms()
    raw_text = (f" (raw p99 {raw['p99']:.2f} ms max {raw['max']:.2f} ms)"
                if info.scheduled else "")
    return (f"[RUN] run {wire.run_label(info.run_id)} | {received} | {missing_text}"
            f" | duplicates {run.duplicates}{resent} | latency p50 {lat['p50']:.2f} ms"
            f" p99 {lat['p99']:.2f} ms p99.9 {lat['p99_9']:.2f} ms max {lat['max']:.2f} ms"
            f"{raw_text} | {reason}")


def run_row(entry):
    """The summary table's row (label, text) for a run's JSON entry (RunState.to_json)."""
    lat = entry["latency_ms"]
    missing = "n/a (several receivers)" if entry["missing"] is None else entry["missing"]
    return (f"run {entry['run_id']}",
            f"{entry['received']}/{entry['planned']} received, missing {missing},"
            f" duplicates {entry['duplicates']}, p50 {lat['p50']:.2f} ms,"
            f" p99 {lat['p99']:.2f} ms, p99.9 {lat['p99_9']:.2f} ms, max {lat['max']:.2f} ms")
