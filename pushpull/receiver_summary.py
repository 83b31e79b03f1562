"""What the receiver says at the end, and every few seconds while it works: the [STATS]
line, the --csv row, the summary table and its JSON (--json).

The script gathers the counts; this module only turns them into lines, rows and
dictionaries, so a reader of the script sees what is counted, not how it is printed.
What both sides share (rates, run facts, tables, --csv series) is in pushpull/cli.py.
"""

import time

from pushpull import cli, runs

RECEIVER_CSV_COLUMNS = ("time_s", "unix_time", "received", "processed", "rate_msg_s", "queue",
                        "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "invalid")


def receiver_stats_line(counters, last, elapsed):
    """One [STATS] line of the receiver; `last` holds the counts of the previous line."""
    received_rate = cli.rate(counters.received - last[0], elapsed)
    processed_rate = cli.rate(counters.processed - last[1], elapsed)
    recovered = f" (+{counters.recovered} recovered)" if counters.recovered else ""
    return (f"[STATS] received {counters.received}{recovered} ({received_rate:.1f}/s) | processed"
            f" {counters.processed} ({processed_rate:.1f}/s) | queue {counters.backlog}"
            f" | invalid {counters.invalid} | connections {counters.peers}")


class ReceiverStats:
    """The receiver's [STATS] line and its --csv row while there is work, every
    --stats-interval (RECEIVER_CSV_COLUMNS: counts cumulative since `started`, the rate
    over the interval)."""

    def __init__(self, counters, run_table, series, interval, log, started):
        self.counters = counters
        self.run_table = run_table  # the processor's runs.RunTable: the latency so far
        self.series = series  # a cli.CsvSeries: a no-op without --csv
        self.interval = interval
        self.log = log
        self.started = started
        self.last = (counters.received, counters.processed)  # at the last interval's end
        self.last_time = time.monotonic()

    def tick(self, now):
        """A [STATS] line and a --csv row, when one is due at `now` (time.monotonic())."""
        elapsed = now - self.last_time
        if elapsed < self.interval:
            return
        counters, last = self.counters, self.last
        current = (counters.received, counters.processed)
        if current != last or counters.backlog:
            self.log.info(receiver_stats_line(counters, last, elapsed))
        # Idle, the row repeats the last one (rate 0) and is left out.
        self.row(counters.backlog, cli.rate(current[1] - last[1], elapsed), now)
        self.last, self.last_time = current, now

    def last_row(self, queue):
        """The final --csv row, `queue` messages left unprocessed: it agrees with the
        summary; its rate is over its own interval, like every row's."""
        now = time.monotonic()
        rate = cli.rate(self.counters.processed - self.last[1], now - self.last_time)
        self.row(queue, rate, now, always=True)

    def row(self, queue, rate, now, always=False):
        """One --csv row: the counts at `now`, `queue` messages waiting, `rate` msg/s
        processed."""
        counters = self.counters
        lat = self.run_table.latency().summary_ms()
        self.series.timed_row(now - self.started,
                              (counters.received + counters.recovered, counters.processed,
                               round(rate, 1), queue, *("" if lat[key] is None else lat[key]
                                                        for key in ("p50", "p99", "max")),
                               counters.invalid), always)

    def close(self):
        """Close the --csv file (the last row is written)."""
        self.series.close()


def receiver_data(counters, run_table, queued, started, stop_kind, config):
    """The receiver's final summary, as the JSON written by --json."""
    duration = time.monotonic() - started
    return {
        **cli.run_facts(config),
        "received": counters.received + counters.recovered,
        "recovered": counters.recovered,
        "processed": counters.processed,
        "duplicates": counters.duplicates,
        "invalid": counters.invalid,
        "spilled": counters.spilled,
        "unprocessed": queued,
        "plain": counters.plain,
        "clock_skew": counters.clock_skew,
        "rejected": counters.rejected,
        "rejected_connections": counters.rejected_connections,
        "unsettled_connections": counters.unsettled,
        "duration_s": round(duration, 3),
        "processed_per_s": round(cli.rate(counters.processed, duration), 1),
        "stop": stop_kind.value,
        "runs": run_table.to_json(),
        "latency_ms": run_table.latency().summary_ms(),
        "latency_raw_ms": run_table.latency(raw=True).summary_ms(),
        "runs_left_out": run_table.left_out,
        "untracked_runs": run_table.refused,
        "untracked": run_table.untracked,
    }


def receiver_table(data):
    """The receiver's aligned table printed at exit, from receiver_data()."""
    rows = [
        ("received", f"{data['received']}" + (f" ({data['recovered']} recovered from spill file)"
                                              if data["recovered"] else "")),
        ("processed", data["processed"]),
        ("duplicates", f"{data['duplicates']} (dropped: processed before)"),
        ("invalid", data["invalid"]),
        ("spilled", data["spilled"]),
        ("rejected", f"{data['rejected']} (CURVE / IP allow list)"),
        ("duration", f"{data['duration_s']:.2f} s"),
        ("rate", f"{data['processed_per_s']:.1f} msg/s processed over the receiver's lifetime,"
                 " idle time included (each run's own rate: its run row)"),
        ("stop", data["stop"]),
    ]
    if data["unsettled_connections"]:
        rows.append(("unsettled", f"{data['unsettled_connections']} connections closed before"
                                  " a handshake shortly before the stop: junk, or peers"
                                  " leaving (not counted invalid)"))
    if data["unprocessed"]:
        rows.append(("LOST", f"{data['unprocessed']} received but neither processed nor spilled"))
    if data["clock_skew"]:
        rows.append(("clock skew", f"{data['clock_skew']} send times out of"
                                   f" {runs.SENT_TIME_WINDOW} s of their receipt"
                                   " (not in the latencies)"))
    rows += [runs.run_row(entry, data["stop"]) for entry in data["runs"]]
    if data["runs_left_out"]:
        rows.append(("runs left out", f"{data['runs_left_out']} older finished runs"
                                      f" (at most {runs.RUNS_LISTED} are kept)"))
    if data["untracked"] or data["untracked_runs"]:
        rows.append(("untracked", f"{data['untracked']} messages processed unchecked, in"
                                  f" {data['untracked_runs']} runs refused a state (over"
                                  f" {runs.OPEN_RUNS_MAX} runs, none silent"
                                  f" {runs.RUN_EVICT_IDLE:g} s) or dropped from the table"))
    return cli.format_table("Receiver summary", rows)
