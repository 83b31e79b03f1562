"""One run's JSON summaries from many hosts, combined: python3 -m pushpull.merge A.json ...

Give the --json summaries of a run's sender instances (async-socket-sender.py
--instances N --run-id ID) and of its receivers. Counts are summed; the send-lag
and latency histograms are merged exactly, from the buckets each summary carries;
the verdict is the whole run's. Exit 0 when every planned message was received,
1 when not (or when a summary the run needs is missing), 2 for summaries of
different runs, a damaged file, or a bad command line.
"""

import argparse
import json
import sys

from pushpull import cli, latency, logs

MERGE_MAX_BYTES = 256 * 1024 * 1024  # bytes of one summary file read at most
MISSING_LISTED = 20  # ranges of missing tasks listed (one receiver's report lists them)


class MergeError(ValueError):
    """Summaries that cannot be merged: damaged, of different runs, or of no run at all."""


def load(path):
    """One --json summary file, parsed; MergeError if it is damaged or not a summary."""
    try:
        with open(path, "rb") as src:
            raw = src.read(MERGE_MAX_BYTES + 1)
    except OSError as exc:
        raise MergeError(f"{path}: cannot read it ({exc.strerror})") from None
    if len(raw) > MERGE_MAX_BYTES:
        raise MergeError(f"{path}: over {MERGE_MAX_BYTES} bytes: not a summary")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MergeError(f"{path}: damaged JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict) or kind(data) is None:
        raise MergeError(f"{path}: neither a sender's nor a receiver's --json summary")
    return data


def kind(data):
    """"sender", "receiver", or None for a dictionary that is neither summary."""
    if isinstance(data.get("runs"), list) and "processed" in data:
        return "receiver"
    if isinstance(data.get("run_id"), str) and _count(data.get("sent")) is not None:
        return "sender"
    return None


def _count(value):
    """`value` if it is a count (a non-negative int, never a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _need(value, path, key):
    """A count read from a summary; MergeError naming the file if it is not one."""
    if _count(value) is None:
        raise MergeError(f"{path}: {key} is not a count")
    return value


def _histogram(data, path, key):
    """The histogram whose buckets `data` carries (None: no samples kept)."""
    if data is None:
        return None
    try:
        return latency.Histogram.from_buckets(data)
    except ValueError as exc:
        raise MergeError(f"{path}: {key}: {exc}") from None


def run_identity(data):
    """(run id label, run name or None, instances) a sender summary says it belongs to."""
    run = _run_of(data)
    name, count = run.get("name"), run.get("instances", 1)
    if not isinstance(name, (str, type(None))) or not _count(count):
        raise MergeError(f"run {data['run_id'][:20]!r}: its run name or instance count is"
                         " damaged")
    return data["run_id"], name, count


def _run_of(data):
    """A sender summary's `run` (a shared run's facts), {} for a run of one."""
    return data["run"] if isinstance(data.get("run"), dict) else {}


def combine_senders(named):
    """The sender instances' summaries [(path, data)] of one run, summed; MergeError if
    they are of different runs, or one instance is given twice."""
    first_path, first = named[0]
    identity = run_identity(first)
    instances_seen, lag = {}, latency.Histogram()
    totals = {"sent": 0, "failed": 0, "planned": 0}
    failed_by_reason = {}
    for path, data in named:
        if run_identity(data) != identity:
            raise MergeError(f"{path}: run {run_identity(data)[:2]} is not the run of"
                             f" {first_path}, {identity[:2]}: summaries of different runs")
        index = _need(_run_of(data).get("instance", 0), path, "instance")
        if index in instances_seen:
            raise MergeError(f"{path}: instance {index} is given twice (also"
                             f" {instances_seen[index]})")
        instances_seen[index] = path
        for key in totals:
            totals[key] += _need(data.get(key), path, key)
        reasons = data.get("failed_by_reason")
        for reason, n in (reasons.items() if isinstance(reasons, dict) else ()):
            failed_by_reason[reason] = failed_by_reason.get(reason, 0) + _need(n, path, reason)
        part = _histogram(data.get("send_lag_buckets"), path, "send_lag_buckets")
        if part is not None:
            lag.merge(part)
    run = _run_of(first)
    return {
        "run_id": identity[0],
        "run_name": identity[1],
        "instances": identity[2],
        "instances_merged": sorted(instances_seen),
        "planned": _need(run.get("planned", totals["planned"]), first_path, "run planned"),
        "sent": totals["sent"],
        "failed": totals["failed"],
        "failed_by_reason": failed_by_reason,
        "send_lag_ms": lag.summary_ms() if lag.count else None,
        "send_lag_buckets": lag.buckets() if lag.count else None,
    }


def combine_receivers(named, run_id):
    """The receivers' runs[] entries for `run_id` [(path, data)], summed; MergeError if a
    receiver has no such run."""
    received = duplicates = clock_skew = 0
    lat, endpoints, missing_tasks = latency.Histogram(), set(), []
    for path, data in named:
        entries = [e for e in data["runs"] if isinstance(e, dict) and e.get("run_id") == run_id]
        if not entries:
            raise MergeError(f"{path}: this receiver has no run {run_id}: a summary of"
                             " another run, or of a receiver the run did not use")
        entry = entries[0]
        received += _need(entry.get("received"), path, "received")
        duplicates += _need(entry.get("duplicates"), path, "duplicates")
        clock_skew += _need(entry.get("clock_skew", 0), path, "clock_skew")
        endpoints.add(_need(entry.get("endpoints"), path, "endpoints"))
        missing_tasks += [t for t in entry.get("missing_tasks") or () if isinstance(t, str)]
        part = _histogram(entry.get("latency_buckets"), path, "latency_buckets")
        if part is None:
            raise MergeError(f"{path}: run {run_id} carries no latency_buckets (a receiver"
                             " older than pushpull.merge?)")
        lat.merge(part)
    return {
        "receivers": len(named),
        "of": endpoints.pop() if len(endpoints) == 1 else None,
        "received": received,
        "duplicates": duplicates,
        "clock_skew": clock_skew,
        "missing_tasks": missing_tasks[:MISSING_LISTED],
        "latency_ms": lat.summary_ms() if lat.count else None,
        "latency_buckets": lat.buckets() if lat.count else None,
    }


def merge(paths):
    """The merged summary of the files at `paths`; MergeError if they cannot be merged."""
    loaded = [(path, load(path)) for path in paths]
    senders = [(p, d) for p, d in loaded if kind(d) == "sender"]
    receivers = [(p, d) for p, d in loaded if kind(d) == "receiver"]
    if not senders:
        raise MergeError("no sender summary: at least one names the run to merge")
    result = combine_senders(senders)
    result["receiver"] = combine_receivers(receivers, result["run_id"]) if receivers else None
    result["verdict"] = judge(result)
    return result


def judge(result):
    """The whole run's verdict: {"passed", "reasons"}."""
    reasons = []
    if len(result["instances_merged"]) < result["instances"]:
        reasons.append(f"summaries of {len(result['instances_merged'])} of"
                       f" {result['instances']} sender instances")
    elif result["sent"] < result["planned"]:
        reasons.append(f"{result['sent']} of {result['planned']} planned messages sent")
    receiver = result["receiver"]
    if receiver is None:
        reasons.append("no receiver summary")
    else:
        if receiver["of"] is not None and receiver["receivers"] < receiver["of"]:
            reasons.append(f"summaries of {receiver['receivers']} of {receiver['of']}"
                           " receivers")
        if receiver["received"] < result["planned"]:
            reasons.append(f"{receiver['received']} of {result['planned']} planned messages"
                           f" received: {result['planned'] - receiver['received']} missing")
    return {"passed": not reasons, "reasons": reasons}


def table(result):
    """The merged summary as an aligned table."""
    name = f" ({logs.shown(str(result['run_name']))})" if result["run_name"] else ""
    rows = [("run", f"{logs.shown(result['run_id'])}{name}"),
            ("instances", f"{len(result['instances_merged'])} of {result['instances']}"),
            ("planned", result["planned"]), ("sent", result["sent"]),
            ("failed", result["failed"])]
    if result["send_lag_ms"]:
        lag = result["send_lag_ms"]
        rows.append(("send lag", f"p99 {lag['p99']:.3f} ms, max {lag['max']:.3f} ms"
                                 " (exact merge)"))
    receiver = result["receiver"]
    if receiver:
        rows.append(("receivers", f"{receiver['receivers']} of {receiver['of']}"))
        rows.append(("received", f"{receiver['received']}/{result['planned']}, duplicates"
                                 f" {receiver['duplicates']}"))
        if receiver["latency_ms"]:
            lat = receiver["latency_ms"]
            rows.append(("latency", f"p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max"
                                    f" {lat['max']:.3f} ms (exact merge)"))
        if receiver["missing_tasks"]:
            rows.append(("missing", logs.shown(", ".join(receiver["missing_tasks"]))))
    verdict = result["verdict"]
    rows.append(("verdict", "passed" if verdict["passed"] else
                 "FAILED: " + "; ".join(verdict["reasons"])))
    return cli.format_table("Merged run", rows)


def main(argv=None):
    """Merge the summaries named on the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python3 -m pushpull.merge", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", metavar="SUMMARY.json",
                        help="--json summaries of the run's senders and receivers")
    parser.add_argument("--json", metavar="PATH", help="also write the merged summary to PATH")
    args = parser.parse_args(argv)
    cli.check_output_path(parser, "--json", args.json)
    try:
        result = merge(args.summaries)
    except MergeError as exc:
        print(f"pushpull.merge: error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        try:
            cli.write_json(args.json, result)
        except OSError as exc:
            print(f"pushpull.merge: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 1
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
