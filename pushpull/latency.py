"""Latency histograms: constant memory, relative error under 1 %, mergeable; and their text form.

Both scripts use them: the receiver for latency_ms / latency_raw_ms, the sender
for send_lag_ms. Values are nanoseconds, so even a 10 µs latency is exact to 1 %.
"""

import bisect

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99_9", 0.999))
TEXT_BARS = 10  # rows of the text histogram
TEXT_WIDTH = 40  # characters of its longest bar
NO_WINDOW = 2**64  # ns: add_batch() without a window keeps every value
BUCKETS_MAX = 64 * 128  # buckets a histogram of 64-bit ns values can have (from_buckets bound)
SPAN_BATCH_MIN = 64  # values in a batch before add_batch() looks for few buckets
SPAN_BUCKETS_PER = 4  # ... and takes them bucket by bucket if it spans at most 1 per 4 values


class Histogram:
    """Log-linear histogram of nanoseconds, as HdrHistogram does it.

    Values under 2 x SUB_BUCKETS are kept exactly; above, each power of two is
    split into SUB_BUCKETS equal buckets, so a bucket's upper bound is within
    1 / SUB_BUCKETS (0.78 %) of any value in it. Two histograms merge by adding counts.
    """

    SUB_BUCKETS = 128
    EXACT = 2 * SUB_BUCKETS
    SHIFT_BASE = EXACT.bit_length() - 1  # 8: log2(EXACT)

    def __init__(self):
        self.counts = {}  # bucket -> samples
        self.count = 0
        self.max_ns = 0

    def add_batch(self, received_ns, stamps, window=None):
        """Record received_ns - stamp for each stamp (ns): one call per batch of messages.

        window (ns): a value further than this from zero, either way, is left out (a
        clock that is wrong, or a forged stamp); returns how many were left out."""
        if len(stamps) >= SPAN_BATCH_MIN and self._add_span(received_ns, stamps, window):
            return 0
        return self._add_each(received_ns, stamps, window)

    def _add_span(self, received_ns, stamps, window):
        """add_batch() of a large batch whose values all fall in a few buckets above EXACT
        (a backlog: each bucket is wide), one bucket at a time; False, nothing recorded,
        for any other batch."""
        # The flood of figure (2) waits in the receiver's queue: a 1000-message batch
        # falls in a few wide buckets, 0.04-0.06 µs a message here, where _add_each()
        # takes 0.15 µs, a quarter of the processor thread's time (bench/README.md,
        # "Profiles", issue 22).
        if not self._few_buckets(received_ns - stamps[0], received_ns - stamps[-1], stamps):
            return False  # judged by the first and last stamps alone: a min() and max()
            # over the batch cost _add_each() 0.03 µs a message more when it falls back
        low, high = received_ns - max(stamps), received_ns - min(stamps)
        if not self._few_buckets(low, high, stamps) or high > (
                NO_WINDOW if window is None else window):
            return False
        ordered = sorted(stamps)  # the last stamp is the smallest value
        counts, sub, base, end = self.counts, self.SUB_BUCKETS, self.SHIFT_BASE, len(ordered)
        while end:
            value = received_ns - ordered[end - 1]
            shift = value.bit_length() - base
            bucket = shift * sub + (value >> shift)
            largest = ((value >> shift) + 1 << shift) - 1  # the bucket's largest value
            start = bisect.bisect_left(ordered, received_ns - largest, 0, end)
            counts[bucket] = counts.get(bucket, 0) + end - start
            end = start
        self.count += len(ordered)
        self.max_ns = max(self.max_ns, high)
        return True

    def _few_buckets(self, first, last, stamps):
        """True if values from `first` to `last` (either way round), all at least EXACT,
        span at most one bucket per SPAN_BUCKETS_PER values of `stamps`."""
        low, high = (first, last) if first <= last else (last, first)
        if low < self.EXACT:
            return False
        shift = low.bit_length() - self.SHIFT_BASE
        return (high - low) >> shift <= len(stamps) // SPAN_BUCKETS_PER

    def _add_each(self, received_ns, stamps, window):
        """add_batch(), one value at a time."""
        counts = self.counts
        get = counts.get
        exact, sub, base = self.EXACT, self.SUB_BUCKETS, self.SHIFT_BASE
        top = self.max_ns
        # One comparison a value on either branch: a min() and max() over the batch
        # first cost 35 ns a message, 7 % of the receiver's processor (bench/README.md).
        limit, left_out = NO_WINDOW if window is None else window, 0
        for stamp in stamps:
            value = received_ns - stamp
            if value < exact:
                if value < -limit:
                    left_out += 1
                    continue
                # The clocks of two hosts can disagree: never report negative time.
                bucket = value if value > 0 else 0
            else:
                if value > limit:
                    left_out += 1
                    continue
                shift = value.bit_length() - base
                bucket = shift * sub + (value >> shift)
                if value > top:
                    top = value
            counts[bucket] = get(bucket, 0) + 1
        self.max_ns = top
        self.count += len(stamps) - left_out
        return left_out

    def add(self, value):
        """Record one nanosecond value."""
        # Once per message on a paced sender (its send lag): 0.44 µs through add_batch(),
        # 0.25 µs here (bench/README.md, "Profiles", issue 22).
        if value < self.EXACT:
            bucket = value if value > 0 else 0
        else:
            shift = value.bit_length() - self.SHIFT_BASE
            bucket = shift * self.SUB_BUCKETS + (value >> shift)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        if value > self.max_ns:
            self.max_ns = value

    def merge(self, other):
        """Add another histogram's samples to this one."""
        get = self.counts.get
        for bucket, n in other.counts.copy().items():  # copy: its owner may be adding
            self.counts[bucket] = get(bucket, 0) + n
        self.count += other.count
        self.max_ns = max(self.max_ns, other.max_ns)

    def copy(self):
        """An independent histogram with the same samples."""
        twin = Histogram()
        twin.merge(self)
        return twin

    def buckets(self):
        """The samples as JSON, for an exact merge elsewhere (pushpull.merge):
        {"sub_buckets", "max_ns", "counts": [[bucket, samples], ...]}."""
        return {"sub_buckets": self.SUB_BUCKETS, "max_ns": self.max_ns,
                "counts": [[b, n] for b, n in sorted(self.counts.copy().items())]}

    @classmethod
    def from_buckets(cls, data):
        """The histogram that buckets() described; ValueError for anything else."""
        if not isinstance(data, dict) or data.get("sub_buckets") != cls.SUB_BUCKETS:
            raise ValueError("not a histogram's buckets")
        pairs, top = data.get("counts"), data.get("max_ns")
        if not isinstance(pairs, list) or len(pairs) > BUCKETS_MAX or not _count(top):
            raise ValueError("bad histogram buckets")
        histogram = cls()
        for pair in pairs:
            if (not isinstance(pair, list) or len(pair) != 2 or not _count(pair[0])
                    or not _count(pair[1]) or pair[0] >= BUCKETS_MAX):
                raise ValueError("bad histogram bucket")
            histogram.counts[pair[0]] = histogram.counts.get(pair[0], 0) + pair[1]
            histogram.count += pair[1]
        histogram.max_ns = top
        return histogram

    def percentile(self, fraction):
        """The value (ns) at or below which `fraction` of the samples lie, within 1 %;
        None without samples (no figure, never 0)."""
        if not self.count:
            return None
        rank = max(1, int(fraction * self.count + 0.999999))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(upper_bound(bucket), self.max_ns)
        return self.max_ns

    def summary_ms(self):
        """p50, p90, p99, p99_9 and max in milliseconds (the JSON form); each None (null)
        without samples."""
        if not self.count:
            return {name: None for name, _ in (*PERCENTILES, ("max", 1))}
        result = {name: round(self.percentile(f) / 1e6, 3) for name, f in PERCENTILES}
        result["max"] = round(self.max_ns / 1e6, 3)
        return result

    def text_lines(self, title):
        """A small text histogram as `hey` prints one: TEXT_BARS log-spaced rows, in ms."""
        if not self.count:
            return [f"{title}: no samples"]
        low = max(lower_bound(min(self.counts)), 1000)
        high = max(self.max_ns, low)
        ratio = (high / low) ** (1 / TEXT_BARS) if high > low else 1.0
        edges = [low * ratio ** (i + 1) for i in range(TEXT_BARS)]
        rows = [0] * TEXT_BARS
        for bucket, n in self.counts.items():
            value = upper_bound(bucket)
            row = next((i for i, edge in enumerate(edges) if value <= edge * 1.000001),
                       TEXT_BARS - 1)
            rows[row] += n
        peak = max(rows) or 1
        digits = len(str(peak))
        lines = [f"{title} (ms, up to):"]
        for edge, n in zip(edges, rows):
            bar = "#" * round(TEXT_WIDTH * n / peak)
            lines.append(f"  {edge / 1e6:10.3f} [{n:>{digits}}] |{bar}")
        return lines


def ms_text(value, digits=2):
    """A summary_ms() figure as text: '0.41 ms', or 'n/a' when there were no samples."""
    return "n/a" if value is None else f"{value:.{digits}f} ms"


def upper_bound(bucket):
    """The largest value (ns) that falls into `bucket`."""
    if bucket < Histogram.EXACT:
        return bucket
    shift = bucket // Histogram.SUB_BUCKETS - 1
    return ((bucket - shift * Histogram.SUB_BUCKETS + 1) << shift) - 1


def lower_bound(bucket):
    """The smallest value (ns) that falls into `bucket`."""
    if bucket < Histogram.EXACT:
        return bucket
    shift = bucket // Histogram.SUB_BUCKETS - 1
    return (bucket - shift * Histogram.SUB_BUCKETS) << shift


def _count(value):
    """True for a non-negative int (never a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def snapshot(histograms):
    """{bucket: count} merged from copies of `histograms`, and their largest value (ns).

    Safe while their owners add to them: each dict.copy() runs in C under the GIL, so
    it is one histogram as it was at one moment (a count may be a batch behind)."""
    merged, top = {}, 0
    get = merged.get
    for histogram in histograms:
        for bucket, n in histogram.counts.copy().items():
            merged[bucket] = get(bucket, 0) + n
        top = max(top, histogram.max_ns)
    return merged, top
