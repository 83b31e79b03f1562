"""--metrics-port: the counters and histograms the scripts already keep, served in
Prometheus text format at /metrics, read at scrape time.

Nothing here runs on the per-message path. A scrape runs on a thread of the small
HTTP server (pushpull/scrape.py) and reads what the script's threads write: plain
ints (each has one writer; a read sees the last value, or the one before) and
histograms copied whole (dict.copy() runs in C under the GIL, so the copy is one
histogram as it was at one moment). A scrape's figures may be a moment old; they are
never wrongly shaped: the cumulative buckets are built from one copy, so they are
monotone and _count is the +Inf bucket.

prometheus-client is imported only when --metrics-port is given (cli.check_live_flags()),
and so is the HTTP server (http.server is 10 ms of a start, inside figure (2)).
"""

import bisect
import errno
import itertools
import sys
import threading
import time

from pushpull import cli, latency, sender_summary, wire
from pushpull.health import LinkState
from pushpull.threads import POLL_S

PREFIX = "pushpull"
# The histograms' `le` bounds: 1, 2.5, 5 per decade from 10 us to 50 s, then 100 s (+Inf
# beyond). A bounded set: 23 series per histogram, whatever the values.
LE_BOUNDS_NS = tuple(int(m * 10 ** e) for e in range(4, 11) for m in (1, 2.5, 5)) + (10 ** 11,)
EVERY_INTERFACE = ("*", "0.0.0.0", "::")


def url(bind, port):
    """The /metrics address as a scraper reaches it (bind * : this host's every address)."""
    host = "0.0.0.0" if bind == "*" else bind
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


# ---------------------------------------------------------------------------
# Histograms: our latency.Histogram as Prometheus cumulative buckets
# ---------------------------------------------------------------------------
def cumulative(counts):
    """(buckets, sum in seconds) for a HistogramMetricFamily from {bucket: count}: each
    value counted under the first bound at or above its bucket's upper bound (within
    1 / Histogram.SUB_BUCKETS of the value); the sum from the buckets' midpoints (within
    1 %)."""
    from prometheus_client.utils import floatToGoString
    per_bound = [0] * (len(LE_BOUNDS_NS) + 1)
    total_ns = 0
    for bucket, n in counts.items():
        high = latency.upper_bound(bucket)
        per_bound[bisect.bisect_left(LE_BOUNDS_NS, high)] += n
        total_ns += n * (latency.lower_bound(bucket) + high) / 2
    sums = list(itertools.accumulate(per_bound))
    buckets = [(floatToGoString(bound / 1e9), n) for bound, n in zip(LE_BOUNDS_NS, sums)]
    buckets.append(("+Inf", sums[-1]))
    return buckets, total_ns / 1e9


class Families:
    """Builds one scrape's metric families, every name under PREFIX."""

    def __init__(self, side):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        self.kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        self.histogram_kind = HistogramMetricFamily
        self.side = side
        self.found = []

    def add(self, kind, name, doc, value, labels=None):
        """One counter (name without _total) or gauge; labels: {label: [(values, value)]}."""
        full = f"{PREFIX}_{self.side}_{name}"
        if labels is None:
            self.found.append(self.kinds[kind](full, doc, value=value))
            return
        (label, rows), = labels.items()
        family = self.kinds[kind](full, doc, labels=[label])
        for label_value, row_value in rows:
            family.add_metric([label_value], row_value)
        self.found.append(family)

    def histogram(self, name, doc, counts):
        """One histogram from {bucket: count} (latency.snapshot())."""
        buckets, total = cumulative(counts)
        self.found.append(self.histogram_kind(f"{PREFIX}_{self.side}_{name}", doc,
                                              buckets=buckets, sum_value=total))


# ---------------------------------------------------------------------------
# What each script exposes
# ---------------------------------------------------------------------------
class ReceiverSource:
    """The receiver's metrics: its Counters, its RunTable's runs and latencies, its queue."""

    def __init__(self, counters, run_table, batches):
        self.counters = counters
        self.run_table = run_table
        self.batches = batches  # receiveflow.BatchQueue: depth and bytes

    def collect(self, out):
        """Add the receiver's families to `out` (a Families)."""
        c, table = self.counters, self.run_table
        kept = table.runs.copy()  # run id -> RunState; the processor adds and drops runs
        open_runs = {**table.open.copy(), **table.unhealed.copy()}  # <= OPEN_RUNS_MAX
        for name, doc, value in (
                ("received", "messages received (a spill file's recovered included)",
                 c.received + c.recovered),
                ("processed", "messages processed", c.processed),
                ("invalid", "messages dropped as invalid", c.invalid),
                ("duplicates", "tasks received again, dropped", c.duplicates),
                ("spilled", "messages saved to the spill file at a stop", c.spilled),
                ("rejected", "peers refused by CURVE or the IP allow list", c.rejected),
                ("rejected_connections", "connections of non-ZeroMQ peers dropped",
                 c.rejected_connections)):
            out.add("counter", name, doc, value)
        out.add("gauge", "missing", "tasks missing from the single-receiver runs reported",
                sum(run.tasks.missing for run in kept.values()
                    if run.closed and run.info.endpoints == 1))
        out.add("gauge", "queue_depth", "messages received, not yet processed", c.backlog)
        out.add("gauge", "queue_bytes", "bytes of the messages in the queue",
                self.batches.nbytes)
        out.add("gauge", "connections", "connected peers (senders and their probes)", c.peers)
        out.add("gauge", "runs_open", "sender runs open or reported incomplete",
                len(open_runs))
        rows = [(wire.run_label(run_id), run.tasks.received) for run_id, run in
                open_runs.items()]
        out.add("gauge", "run_received", "tasks received of each open run", None,
                {"run": rows})
        left_out = (table.left_out_latency, table.left_out_latency_raw)
        for name, raw in (("latency_seconds", False), ("raw_latency_seconds", True)):
            counts, _ = latency.snapshot(
                [left_out[raw]] + [run.latency_raw if raw else run.latency
                                   for run in kept.values()])
            out.histogram(name, "receive time - intended send time (raw: actual send"
                                " time), every run" if not raw else
                          "receive time - actual send time, every run", counts)


class SenderSource:
    """The sender's metrics: its workers' tallies and send lag, its receivers' health,
    confirmations; once the run is reported (final()), the summary's own figures."""

    def __init__(self, config, run_label, workers, health, confirmations, started,
                 per_connection):
        self.config = config
        self.per_connection = per_connection  # messages one connection holds (at_risk)
        self.run_label = run_label
        self.workers = workers
        self.health = health
        self.confirmations = confirmations
        self.started = started
        self.data = None  # the summary (sender_summary.sender_data()) once the run is reported

    def final(self, data):
        """From now on expose the summary's figures, as the JSON has them."""
        self.data = data

    def live(self):
        """sent, failed, resent, confirmed, at_risk, achieved rate: now, or as reported."""
        if self.data is not None:
            d = self.data
            return (d["sent"], d["failed"], d.get("resent", 0), d.get("confirmed", 0),
                    d["at_risk"], d["sent_per_s"])
        workers = self.workers
        counts = sender_summary.outcome_counts(self.config, workers)
        sent = counts[sender_summary.Outcome.SENT]
        confirmations = self.confirmations
        return (sent, sum(counts.values()) - sent,
                confirmations.resent() if confirmations else 0,
                confirmations.confirmed() if confirmations else 0,
                0 if confirmations else sender_summary.at_risk(workers, self.health,
                                                               self.per_connection),
                cli.rate(sent, time.monotonic() - self.started))

    def collect(self, out):
        """Add the sender's families to `out` (a Families)."""
        sent, failed, resent, confirmed, risk, rate = self.live()
        config = self.config
        out.add("gauge", "planned", "messages the run plans to send", config.planned)
        out.add("counter", "sent", "messages handed to ZeroMQ", sent)
        out.add("counter", "failed", "planned messages not sent (every reason)", failed)
        out.add("counter", "resent", "frames resent (--confirm)", resent)
        out.add("counter", "confirmed", "tasks confirmed processed (--confirm)", confirmed)
        out.add("gauge", "at_risk", "sent messages that may not have arrived", risk)
        out.add("gauge", "target_rate", "messages per second the schedule asks of this"
                                        " process (0: a flood)", target_rate(config))
        out.add("gauge", "achieved_rate", "messages per second sent since the start",
                rate)
        states = self.health.states.copy()
        out.add("gauge", "receiver_up", "1 while the heartbeat sees the receiver up", None,
                {"endpoint": [(ep, 1 if state is LinkState.UP else 0)
                              for ep, state in states.items()]})
        out.add("gauge", "run_info", "the run this sender sends (value 1)", None,
                {"run": [(self.run_label, 1)]})
        counts, _ = latency.snapshot([w.lag for w in self.workers])
        out.histogram("send_lag_seconds", "actual - intended send time", counts)


def target_rate(config):
    """Messages per second the schedule asks of this process: its workers' share of
    --rate (of a run shared by several instances, sum them), or workers / --delay; 0 for
    a flood."""
    if config.rate:
        return config.rate * config.workers / config.plan.run_workers(config.workers)
    return config.workers / config.delay if config.delay else 0.0


# ---------------------------------------------------------------------------
# The HTTP server
# ---------------------------------------------------------------------------
class Exporter:
    """Serves /metrics from a background thread; watch() names what it reads."""

    def __init__(self, side, bind, port):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry

        from pushpull.scrape import ScrapeServer
        self.side = side
        self.bind = bind
        self.port = port
        self.content_type = CONTENT_TYPE_LATEST
        self._generate = generate_latest
        self.registry = CollectorRegistry(auto_describe=False)  # ours only: no process_*
        self.registry.register(self)
        self.source = None  # ReceiverSource or SenderSource, once its threads run
        self.log = None
        self.is_final = False  # the source's figures will not change any more
        self.final_served = threading.Event()  # a scrape read them
        self.scraped = False  # a scraper has come: it will want the final figures
        self.server = ScrapeServer(bind, port, self)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(POLL_S,),
                                       name="metrics-server", daemon=True)
        self.thread.start()

    def collect(self):
        """The registry's collector: the source's families, read now."""
        if self.source is None:
            return []
        out = Families(self.side)
        self.source.collect(out)
        return out.found

    def render(self):
        """One scrape's body (bytes), and whether it holds the final figures."""
        final = self.is_final
        body = self._generate(self.registry)
        self.scraped = True
        return body, final

    def served(self, final):
        """A scrape's body was written whole; one of the final figures ends hold()."""
        # Set once the body is written, not when it is built: hold() returning lets the
        # process exit, and a scrape thread cut off mid-write left its scraper a
        # truncated reply (IncompleteRead in test_metrics, once in 12 loaded runs).
        if final:
            self.final_served.set()

    def watch(self, source, log):
        """Expose `source` from now on; the first time, log where (a warning if it is every
        interface)."""
        first, self.log, self.source = self.source is None, log, source
        if not first:  # a --find-max step after the first: a new run, the same endpoint
            return
        log.info(f"[METRICS] serving {url(self.bind, self.port)}")
        if self.bind in EVERY_INTERFACE:
            log.warning(f"[METRICS] bound to every interface: anyone who can reach port"
                        f" {self.port} can read this run's metrics (--metrics-bind)")

    def final(self, data):
        """The run's summary (the JSON's dict): the source exposes its figures from now on."""
        if self.source is not None and hasattr(self.source, "final"):
            self.source.final(data)
        self.is_final = True  # a scrape from now on ends hold()

    def hold(self, hold_s, signals):
        """The figures are final: keep serving them until a scrape has read them, at
        most `hold_s` seconds, or until another Ctrl+C. No wait when nothing ever
        scraped this process."""
        self.is_final = True
        if not self.scraped or self.final_served.is_set() or not hold_s:
            return
        if self.log is not None:
            self.log.info(f"[METRICS] waiting up to {hold_s:g} s for a scrape of the final"
                          " figures (Ctrl+C: exit now)")
        deadline = time.monotonic() + hold_s
        count = signals.count
        while (time.monotonic() < deadline and signals.count == count
               and not self.final_served.wait(POLL_S)):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop serving: the listening socket closes; scrapes in progress are cut off."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(POLL_S * 10)


class NoExporter:
    """No --metrics-port: every call does nothing."""

    def watch(self, source, log):
        """Nothing to expose."""

    def final(self, data):
        """Nothing to expose."""

    def hold(self, hold_s, signals):
        """Nothing to hold."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        """Nothing to close."""


def start(prog, side, port, bind):
    """The exporter for --metrics-port (NoExporter without one); exit 2 with one line if
    the port cannot be bound."""
    if port is None:
        return NoExporter()
    try:
        return Exporter(side, bind, port)
    except OSError as exc:
        reason = (f"port {port} is in use by another program"
                  if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        print(f"{prog}: error: cannot serve --metrics-port on {url(bind, port)}: {reason}",
              file=sys.stderr)
        raise SystemExit(2) from None
