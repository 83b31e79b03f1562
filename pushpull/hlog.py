"""--hlog: latency over time as an HdrHistogram interval log (.hlog), which
HistogramLogAnalyzer and HdrLogProcessing open.

Every interval, each tag's histogram (the receiver: each run's latency; the sender:
its run's send lag) is copied and compared with its copy of the interval before; what
was added in between becomes one HdrHistogram (via the hdrhistogram package, imported
only with --hlog), written as one `Tag=RUN,start,length,max,HISTFAAA...` line. The
per-message path is untouched: the copies are taken on the thread that prints [STATS].

Values are nanoseconds: each of our buckets (latency.Histogram, within 0.78 %) is
recorded at its upper bound (never above the histogram's max), with its count, into an
HdrHistogram of HLOG_DIGITS significant digits: a percentile read back agrees with the
JSON's within 1 %.
"""

import time

from pushpull import latency, wire

HLOG_DIGITS = 3  # significant decimal digits of each interval's HdrHistogram (0.1 %)
HLOG_HIGHEST_NS = 86_400 * 10 ** 9  # ns: larger values are recorded as this (a day)
MAX_VALUE_RATIO = 1e6  # the line's Interval_Max is in ms: ns / 1e6, as jHiccup writes it
LOG_FORMAT_VERSION = "1.3"


class IntervalLog:
    """One .hlog file: a header at open, one line per tag with new values per interval.

    `histograms()` returns {tag: [latency.Histogram, ...]} of every tag now; it runs on
    the caller's thread (the one that calls tick()), while other threads may add to them.
    A write that fails (a full disk) is logged once, and the log stops there: the run
    goes on.
    """

    def __init__(self, path, what, histograms, interval, now, log):
        from hdrh.histogram import HdrHistogram
        self.path = path
        self.log = log
        self.failed = False
        self.histograms = histograms
        self.interval = interval
        self.out = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.hdr = HdrHistogram(1, HLOG_HIGHEST_NS, HLOG_DIGITS)
        self.seen = {}  # tag -> {bucket: count} at the end of the last interval
        self.base_wall = time.time()  # the log's BaseTime: its timestamps are relative
        self.base = self.last = now  # time.monotonic()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.base_wall))
        self.out.write(f"#[{what}; values in nanoseconds]\n"
                       f"#[Histogram log format version {LOG_FORMAT_VERSION}]\n"
                       f"#[StartTime: {self.base_wall:.3f} (seconds since epoch), {stamp}]\n"
                       f"#[BaseTime: {self.base_wall:.3f} (seconds since epoch)]\n"
                       '"StartTimestamp","Interval_Length","Interval_Max",'
                       '"Interval_Compressed_Histogram"\n')
        self.out.flush()

    def tick(self, now):
        """Write the interval that ended at `now` (time.monotonic()) when one is due."""
        if now - self.last >= self.interval and not self.failed:
            try:
                self.write_interval(now)
            except OSError as exc:
                self.fail(exc)

    def fail(self, exc):
        """A write failed: say so once; no more intervals are written."""
        self.failed = True
        self.log.error(f"[ERROR] cannot write --hlog {self.path}: {exc.strerror or exc};"
                       " it stops here, the run goes on")

    def write_interval(self, now):
        """One line per tag whose histograms gained values since the last interval."""
        start, length = self.last - self.base, now - self.last
        for tag, histograms in self.histograms().items():
            counts, top = latency.snapshot(histograms)
            before = self.seen.get(tag, {})
            added = {b: n - before.get(b, 0) for b, n in counts.items()
                     if n > before.get(b, 0)}
            self.seen[tag] = counts
            if added:
                self.write_line(tag, start, length, added, top)
        self.out.flush()
        self.last = now

    def write_line(self, tag, start, length, added, top):
        """One interval's line: `added` ({bucket: count}) as an HdrHistogram."""
        hdr = self.hdr
        hdr.reset()
        for bucket, n in added.items():
            value = min(latency.upper_bound(bucket), top or latency.upper_bound(bucket),
                        HLOG_HIGHEST_NS)
            hdr.record_value(value, n)
        payload = hdr.encode().decode("ascii")
        self.out.write(f"Tag={tag},{start:.3f},{length:.3f},"
                       f"{hdr.get_max_value() / MAX_VALUE_RATIO:.3f},{payload}\n")

    def close(self, now):
        """Write the last (partial) interval and close the file."""
        try:
            if not self.failed:
                self.write_interval(now)
            self.out.close()
        except OSError as exc:
            self.fail(exc)


class NoLog:
    """No --hlog: every call does nothing."""

    def tick(self, now):
        """Nothing to write."""

    def close(self, now):
        """Nothing to close."""


class Ticks:
    """Several tick(now) objects called as one: the [STATS] line's, and the .hlog's."""

    def __init__(self, *tickers):
        self.tickers = tickers

    def tick(self, now):
        """Each one's tick(now), in order."""
        for ticker in self.tickers:
            ticker.tick(now)


def run_latencies(run_table):
    """For the receiver's IntervalLog: each run kept by `run_table` (runs.RunTable) -> its
    latency histogram, tagged by the run's label."""
    def histograms():
        return {wire.run_label(run_id): [run.latency]
                for run_id, run in run_table.runs.copy().items()}  # copy: the processor adds
    return histograms


def open_log(path, what, histograms, interval, now, log):
    """The IntervalLog for --hlog PATH, or NoLog without one; OSError if it cannot be
    written."""
    if path is None:
        return NoLog()
    return IntervalLog(path, what, histograms, interval, now, log)
