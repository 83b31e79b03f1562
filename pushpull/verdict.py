"""The receiver's verdict in the sender's summary: its run reports, merged, and the gates.

A receiver publishes its runs[] entry for a run on the confirmation channel when
the run's [RUN] line is logged (channel.Kind.REPORT). Everything in it came from
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


def arrived(entry):
    """Messages of the run a report says arrived: its `received`, and its `untracked` (tasks
    past the receiver's task-state bound: processed, not checked for duplicates). A
    receiver with a share of a flood has gaps everywhere, and so often untracked tasks."""
    return count(entry, "received") + (count(entry, "untracked") or 0)


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


def refusal(entry, sent, planned, only_receiver):
    """Why a report cannot be true of this run, or None. It must plan what the sender
    planned, and count no more received than were sent (to that receiver, when it is
    the only one: with several, PUSH does not say which got what)."""
    reported = count(entry, "planned")
    if reported != planned:
        return f"it says planned {reported}, where this run planned {planned}"
    received = arrived(entry)
    if received > sent:
        to = " to it" if only_receiver else ""
        return f"it says {received} arrived, more than the {sent} messages sent{to}"
    return None


def merge(entries, planned, sent=None, every=False):
    """One verdict from the reports of several receivers, each holding a share of the run.

    Counts add up. Percentiles of shares do not: the merged p99 is the largest
    receiver's p99, an upper bound of the whole run's (and exact with one receiver).
    Tasks processed by two receivers (a --confirm resend dealt to another one) are in
    no receiver's duplicates: when `every` receiver reported, at least
    Σ received - `sent` of them are (duplicates_across; None when unknown).
    """
    received = sum(arrived(e) for e in entries)
    lat = {}
    for entry in entries:
        for key, value in latency(entry).items():
            lat[key] = max(lat.get(key, 0), value)
    across = max(0, received - sent) if every and sent is not None else None
    return {
        "receivers": len(entries),
        "planned": planned,
        "received": received,
        "missing": max(0, planned - received),
        "duplicates": sum(count(e, "duplicates") for e in entries) + (across or 0),
        "untracked": sum(count(e, "untracked") or 0 for e in entries),
        "duplicates_across": across,
        "latency_ms": lat,
        "latency_merged": "max over receivers (an upper bound)" if len(entries) > 1 else "exact",
    }


def reported_received(receiver_report):
    """What the receivers say arrived of the run, when every receiver reported it; else None."""
    if receiver_report["receivers"] and "reason" not in receiver_report:
        return receiver_report["received"]
    return None


def risk(sent, lapse_bound, receiver_report):
    """(at_risk, exact): of `sent` messages, how many may not have reached any receiver.

    Never more than the counted reports lack (sent - Σ received), which is exact when
    it is 0, or when every receiver reported and none was seen down after it was handed
    messages (`lapse_bound` 0: ReceiverHealth.lapse_bound). A receiver seen down may
    have been replaced by a new instance that does not speak for the old one: then
    at_risk is that lack, at most `lapse_bound`. A report refused, or replaced by a
    later instance's, is not counted: its part stays at risk, in the lack. Plain PUSH
    deals each message once, so reports (replaced ones too) counting more than was sent
    prove nothing: all is at risk."""
    received = receiver_report["received"] if receiver_report["receivers"] else 0
    if received > sent or receiver_report.get("inconsistent"):
        return sent, False
    lacking = sent - received
    if receiver_report.get("refused_reports") or receiver_report.get("replaced_reports"):
        return lacking, False
    if not lacking and receiver_report["receivers"]:
        return 0, True  # every sent message is in a counted report
    if reported_received(receiver_report) is not None and not lapse_bound:
        return lacking, True
    return min(lapse_bound, lacking), False


def report_line(verdict):
    """The summary's text for a merged verdict: 'receiver: 500/500 received, p99 0.41 ms'."""
    lat = verdict["latency_ms"]
    p99 = f", p99 {lat['p99']:.2f} ms" if "p99" in lat else ""
    shares = f" (from {verdict['receivers']} receivers)" if verdict["receivers"] > 1 else ""
    across = verdict.get("duplicates_across")
    where = (f" ({across} at least across receivers: --confirm resends processed by two)"
             if across else "")
    untracked = verdict.get("untracked")
    unchecked = f" ({untracked} of them unchecked for duplicates)" if untracked else ""
    return (f"{verdict['received']}/{verdict['planned']} received{unchecked}, missing"
            f" {verdict['missing']}, duplicates {verdict['duplicates']}{where}{p99}{shares}")


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
