"""Per-run statistics: the latency histogram."""

class LatencyHistogram:
    """Log-linear histogram of microseconds: constant memory, about 1.5 % resolution."""

    SUB_BUCKETS = 64

    def __init__(self):
        self.counts = {}
        self.count = 0
        self.max_us = 0

    def add_batch(self, received_ns, sent_ns):
        """Record the latencies of messages received together at `received_ns`, one per
        send time in `sent_ns` (ns since the epoch); one call per batch, not per message."""
        received_us = received_ns // 1000
        counts = self.counts
        get = counts.get
        small = 2 * self.SUB_BUCKETS
        sub_buckets = self.SUB_BUCKETS
        top = self.max_us
        for sent in sent_ns:
            micros = received_us - sent // 1000
            if micros < small:
                # The clocks of two hosts can disagree: never report negative time.
                bucket = micros if micros > 0 else 0
            else:
                shift = micros.bit_length() - 7  # 2 ** 7 == small
                bucket = shift * sub_buckets + (micros >> shift)
            if micros > top:
                top = micros
            counts[bucket] = get(bucket, 0) + 1
        self.max_us = top
        self.count += len(sent_ns)

    def percentile(self, fraction):
        """The latency (µs) below which `fraction` of the samples lie."""
        if not self.count:
            return 0
        rank = max(1, int(fraction * self.count + 0.999999))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self._upper_bound(bucket), self.max_us)
        return self.max_us

    def _upper_bound(self, bucket):
        if bucket < 2 * self.SUB_BUCKETS:
            return bucket
        shift = bucket // self.SUB_BUCKETS - 1
        return ((bucket - shift * self.SUB_BUCKETS + 1) << shift) - 1

    def summary_ms(self):
        """p50, p99 and max in milliseconds, for the JSON summary."""
        return {
            "p50": round(self.percentile(0.50) / 1000, 3),
            "p99": round(self.percentile(0.99) / 1000, 3),
            "max": round(self.max_us / 1000, 3),
        }
