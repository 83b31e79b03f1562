"""The receiver's verdict in the sender's summary: its run reports, merged, and the gates.

A receiver publishes its runs[] entry for a run on the confirmation channel when
the run's [RUN] line is logged (confirm.Kind.REPORT). Everything in it came from
the network: it is bounded and validated here before the sender uses it, and
every string in it is escaped before it can reach a log line.
"""

import json
import math
import re
from dataclasses import dataclass

from pushpull import logs

REPORT_MAX_BYTES = 16384  # bytes of JSON a report may carry; a receiver sends none larger
REPORT_DEPTH = 4  # nesting levels of a report kept; deeper values are dropped
REPORT_ITEMS = 64  # keys of an object, or items of a list, kept in a report
REPORT_TEXT = 200  # characters of a string kept in a report
REPORT_NUMBER_MAX = 2 ** 63  # larger counts (or any larger number) are not believed
KEY_PATTERN = re.compile(r"^[a-z0-9_]{1,40}$")
COUNTS = ("planned", "received", "duplicates")  # a report without these is not used
PERCENTILES = ("p50", "p90", "p99", "p99_9", "max")  # latency keys, when present


def bounded(value, depth=REPORT_DEPTH):
    """A copy of a JSON value with every container, string and number bounded; None if unusable."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value if -REPORT_NUMBER_MAX <= value <= REPORT_NUMBER_MAX else None
    if isinstance(value, str):
        return logs.shown(value[:REPORT_TEXT])
    if depth <= 0:
        return None
    if isinstance(value, list):
        return [bounded(item, depth - 1) for item in value[:REPORT_ITEMS]]
    if isinstance(value, dict):
        return {key: bounded(item, depth - 1)
                for key, item in list(value.items())[:REPORT_ITEMS] if KEY_PATTERN.match(key)}
    return None


def count(entry, key):
    """entry[key] if it is a count (an int from 0 to REPORT_NUMBER_MAX), else None."""
    value = entry.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value:
        return value
    return None


def latency(entry):
    """The report's latency_ms percentiles that are finite, non-negative numbers."""
    lat = entry.get("latency_ms")
    if not isinstance(lat, dict):
        return {}
    return {key: lat[key] for key in PERCENTILES
            if isinstance(lat.get(key), (int, float)) and not isinstance(lat[key], bool)
            and lat[key] >= 0}


def parse_report(payload):
    """A receiver's runs[] entry from a REPORT payload (JSON), bounded and checked; or None."""
    if len(payload) > REPORT_MAX_BYTES:
        return None
    try:
        entry = bounded(json.loads(payload.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or any(count(entry, key) is None for key in COUNTS):
        return None
    return entry


def merge(entries, planned):
    """One verdict from the reports of several receivers, each holding a share of the run.

    Counts add up. Percentiles of shares do not: the merged p99 is the largest
    receiver's p99, an upper bound of the whole run's (and exact with one receiver).
    """
    received = sum(count(e, "received") for e in entries)
    lat = {}
    for entry in entries:
        for key, value in latency(entry).items():
            lat[key] = max(lat.get(key, 0), value)
    return {
        "receivers": len(entries),
        "planned": planned,
        "received": received,
        "missing": max(0, planned - received),
        "duplicates": sum(count(e, "duplicates") for e in entries),
        "latency_ms": lat,
        "latency_merged": "max over receivers (an upper bound)" if len(entries) > 1 else "exact",
    }


def reported_received(receiver_report):
    """What the receivers say arrived of the run, when every receiver reported it; else None."""
    if receiver_report["receivers"] and "reason" not in receiver_report:
        return receiver_report["received"]
    return None


def risk(sent, bound, receiver_report):
    """(at_risk, exact): of `sent` messages, those the receivers' reports lack, exactly, when
    every receiver reported the run; else `bound`, the sender's own upper bound."""
    received = reported_received(receiver_report)
    if received is None:
        return min(bound, sent), False
    return max(0, sent - received), True


def report_line(verdict):
    """The summary's text for a merged verdict: 'receiver: 500/500 received, p99 0.41 ms'."""
    lat = verdict["latency_ms"]
    p99 = f", p99 {lat['p99']:.2f} ms" if "p99" in lat else ""
    shares = f" (from {verdict['receivers']} receivers)" if verdict["receivers"] > 1 else ""
    return (f"{verdict['received']}/{verdict['planned']} received, missing {verdict['missing']},"
            f" duplicates {verdict['duplicates']}{p99}{shares}")


@dataclass(frozen=True)
class Gate:
    """One pass/fail limit on the receiver's verdict (--max-loss, --max-p99)."""

    name: str  # the flag without its dashes: max-loss, max-p99
    limit: float

    def value(self, verdict):
        """The verdict's figure this gate judges, or None."""
        if self.name == "max-loss":
            return round(100 * verdict["missing"] / max(1, verdict["planned"]), 4)
        return verdict["latency_ms"].get("p99")

    def judge(self, verdict, why_none):
        """The JSON record {name, limit, value, passed} (and the reason when there is no value)."""
        value = None if verdict is None else self.value(verdict)
        record = {"name": self.name, "limit": self.limit, "value": value,
                  "passed": value is not None and value <= self.limit}
        if value is None:
            record["reason"] = why_none if verdict is None else "the report has no p99"
        return record


def gate_line(record, unit):
    """The [GATE] line for one judged gate."""
    verdict = "passed" if record["passed"] else "FAILED"
    value = (f"value {record['value']:g} {unit}" if record["value"] is not None
             else f"no value: {record['reason']}")
    return f"[GATE] {record['name']} {verdict}: limit {record['limit']:g} {unit}, {value}"
