"""What the sender says at the end of a run, and every few seconds during it: the
[STATS] line, the --csv row, the summary table and its JSON (--json), and the exit
status with its one-line reason.

The script gathers the counts; this module only turns them into lines, rows and
dictionaries, so a reader of the script sees what is counted, not how it is printed.
What both sides share (rates, run facts, tables, --csv series) is in pushpull/cli.py.
"""

import enum
import time

from pushpull import cli, instances, latency, verdict, wire
from pushpull.health import LinkState
from pushpull.push import Outcome

UNCONFIRMED_LISTED = 10  # workers, and ranges of tasks per worker, the summary table lists
UNCONFIRMED_JSON_MAX = 10000  # task numbers per worker the JSON summary lists at most
GATE_UNITS = {"max-loss": "%", "max-p99": "ms"}  # the unit of each gate's limit and value
SENDER_CSV_COLUMNS = ("time_s", "unix_time", "sent", "rate_msg_s", "send_lag_p99_ms",
                      "waiting", "receivers_up")
SECRET_SETTINGS = ("curve_keys",)  # the sender's Config fields never written to the JSON
# Written apart: a shared run's `run` (a run of one keeps its JSON as it was).
UNLISTED_SETTINGS = (*SECRET_SETTINGS, "plan")
RUN_MISSING_LISTED = 20  # ranges of a shared run's missing tasks its summary lists


class SenderExit(enum.IntEnum):
    """The sender's exit statuses."""

    OK = 0
    NOT_ALL_SENT = 1  # also: a gate failed, or the run could not start
    BAD_COMMAND_LINE = 2  # as argparse exits for a bad flag
    INTERRUPTED = 130


class SenderStats:
    """The [STATS] line and the --csv row, every STATS_INTERVAL while the workers send."""

    def __init__(self, config, workers, health, series, log):
        self.config = config
        self.workers = workers
        self.health = health
        self.series = series  # a cli.CsvSeries: a no-op without --csv
        self.log = log
        self.started = self.last_time = time.monotonic()
        self.last_sent = 0

    def tick(self, now):
        """A [STATS] line and a --csv row, when one is due at `now` (time.monotonic())."""
        if now - self.last_time >= self.config.stats_interval:
            self.series.timed_row(now - self.started, sender_csv_row(
                self.workers, self.health, self.last_sent, now - self.last_time))
            line, self.last_sent = sender_stats_line(self.config, self.workers, self.health,
                                                     self.last_sent, now - self.last_time,
                                                     now - self.started)
            self.log.info(line)
            self.last_time = now

    def last_row(self):
        """The last --csv row, written once every worker is done: it agrees with the summary."""
        now = time.monotonic()
        self.series.timed_row(now - self.started, sender_csv_row(
            self.workers, self.health, self.last_sent, now - self.last_time), always=True)


def sender_stats_line(config, workers, health, last_sent, elapsed, total_elapsed):
    """One [STATS] line; returns it with the sent count for the next one."""
    counts = outcome_counts(config, workers)
    sent = counts[Outcome.SENT]
    failed = sum(counts.values()) - sent
    recent = cli.rate(sent - last_sent, elapsed)
    remaining = config.planned - sent - failed
    overall = cli.rate(sent, total_elapsed)
    eta = f"{remaining / overall:.1f} s" if overall > 0 else "-"
    waiting = sum(1 for w in workers if w.tally.waiting)
    line = (f"[STATS] sent {sent}/{config.planned} ({100 * sent / max(1, config.planned):.1f}%)"
            f" | {recent:.1f} msg/s | failed {failed} | waiting {waiting}"
            f" | receiver {health.describe()} | ETA {eta}")
    confirmations = workers[0].confirmations if workers else None
    if confirmations is not None:  # once all is sent, the wait for these is the run's rest
        line += f" | confirmed {confirmations.confirmed()}/{config.planned}"
    return line, sent


def sender_csv_row(workers, health, last_sent, elapsed):
    """One --csv row (SENDER_CSV_COLUMNS) after its clocks: counts cumulative since the
    start, the rate over the interval."""
    sent = sum(w.tally.sent for w in workers)
    lag = merged_lag(workers)
    return (sent, round(cli.rate(sent - last_sent, elapsed), 1),
            round(lag.percentile(0.99) / 1e6, 3) if lag.count else "",
            sum(1 for w in workers if w.tally.waiting),
            sum(1 for state in health.states.values() if state is LinkState.UP))


def outcome_counts(config, workers):
    """Outcome -> count, summed over the workers."""
    result = dict.fromkeys(Outcome, 0)
    for worker in workers:
        result[Outcome.SENT] += worker.tally.sent
        for outcome, count in worker.tally.failed.items():
            result[outcome] += count
        if worker.failed:  # the traceback is in the log; what it had not done is lost
            result[Outcome.WORKER_ERROR] += config.messages - worker.tally.done()
    return result


def at_risk(workers, health, per_connection):
    """The sender's own bound of the sent messages that may not have arrived: what the
    receivers seen down after they were handed messages may have lost (ReceiverHealth's
    lapses), never more than was sent. `per_connection`: what one connection can hold."""
    return health.lapse_bound(per_connection, [w.tally.sent for w in workers])


def merged_lag(workers):
    """The send lag of every worker, in one histogram."""
    lag = latency.Histogram()
    for worker in workers:
        lag.merge(worker.lag)
    return lag


def receiver_verdict(config, channel, sent):
    """The receiver_report JSON: the reports that pass the checks (verdict.refusal), one per
    receiver endpoint (its current instance), merged; the refused and replaced ones named;
    why any are missing."""
    sources, every_receiver = channel.collected()
    # What the receivers can have received: what this process sent, or in a run shared
    # by several instances (--instances), what the whole run planned.
    ceiling = config.run_planned if config.plan.shared else sent
    only_receiver = len(config.endpoints) == 1 and not config.plan.shared
    counted, refused, replaced = [], [], []
    for endpoint, current, older in sources:
        replaced += [{"endpoint": endpoint, "instance": instance.hex(),
                      "received": verdict.arrived(entry)} for instance, entry in older]
        if current is None:
            continue
        why = verdict.refusal(current[1], ceiling, config.run_planned, only_receiver)
        if why:
            refused.append({"endpoint": endpoint, "instance": current[0].hex(), "reason": why})
        else:
            counted.append(current[1])
    if not counted and not refused:
        return {"receivers": 0, "of": len(config.endpoints), "reason": channel.why_no_report()}
    every_receiver = every_receiver and not refused
    result = verdict.merge(counted, config.run_planned, ceiling if config.confirm else None,
                           every_receiver)
    result["of"] = len(config.endpoints)
    result["refused_reports"] = refused
    result["replaced_reports"] = replaced
    if not every_receiver:
        result["reason"] = "not every receiver reported: " + "; ".join(
            [f"{r['endpoint']}'s report refused ({r['reason']})" for r in refused]
            + ([channel.why_no_report()] if not channel.all_reported() else []))
    claimed = result["received"] + sum(r["received"] for r in replaced)
    if not config.confirm and claimed > ceiling:
        result["inconsistent"] = (f"the reports (replaced ones too) count {claimed} received"
                                  f" of {ceiling} sent, and PUSH deals each message once: a"
                                  " report is false")
    result["reports"] = counted
    return result


def judge_gates(config, receiver_report):
    """The JSON `gates`: each gate set on the command line, judged on the receivers' report."""
    gates = [verdict.Gate(name, limit) for name, limit in (("max-loss", config.max_loss),
                                                           ("max-p99", config.max_p99))
             if limit is not None]
    if not receiver_report["receivers"]:
        merged, why = None, f"no report: {receiver_report.get('reason')}"
    elif "reason" in receiver_report:  # a share of the run says nothing of the whole
        merged, why = None, f"partial reports only ({receiver_report['reason']})"
    elif "inconsistent" in receiver_report:
        merged, why = None, receiver_report["inconsistent"]
    else:
        merged, why = receiver_report, None
    return [gate.judge(merged, why) for gate in gates]


def unconfirmed_tasks(window, tally):
    """The first UNCONFIRMED_JSON_MAX task numbers a worker never had confirmed, in order."""
    tasks = set(window.frames)
    for unsent in tally.not_sent:
        tasks.update(unsent[:UNCONFIRMED_JSON_MAX])
    return sorted(tasks)[:UNCONFIRMED_JSON_MAX]


def task_ranges(tasks):
    """Sorted task numbers as ranges of text: [0, 1, 2, 5] -> ['0-2', '5']."""
    ranges = []
    for task in tasks:
        if ranges and task == ranges[-1][1] + 1:
            ranges[-1][1] = task
        else:
            ranges.append([task, task])
    return [f"{first}" if first == last else f"{first}-{last}" for first, last in ranges]


def confirmation_data(config, workers, confirmations):
    """--confirm results: what was confirmed, resent, and which tasks never were."""
    confirmed = confirmations.confirmed()
    never = {w.name: unconfirmed_tasks(window, w.tally)
             for w, window in zip(workers, confirmations.windows)}
    return {
        "confirmed": confirmed,
        "resent": confirmations.resent(),
        "unconfirmed": config.planned - confirmed,
        "unconfirmed_tasks": {name: tasks for name, tasks in never.items() if tasks},
        "unconfirmed_ranges": {name: task_ranges(tasks) for name, tasks in never.items()
                               if tasks},
    }


def sender_data(config, run, workers, health, confirmations, flush, receiver_report, duration,
                per_connection):
    """The final summary, as the JSON written by --json. `per_connection`: messages one
    worker's connection can hold (sendflow.in_flight_bound), what a lapse may lose."""
    counts = outcome_counts(config, workers)
    sent = counts[Outcome.SENT]
    failed = {o.value: n for o, n in counts.items() if o is not Outcome.SENT}
    confirmation = (confirmation_data(config, workers, confirmations)
                    if confirmations is not None else {})
    # Under --confirm, `unconfirmed` says what may not have arrived, exactly.
    lapsed = at_risk(workers, health, per_connection)
    risk, exact = (verdict.risk(sent, lapsed, receiver_report)
                   if confirmations is None else (0, False))
    shared = shared_run(config, receiver_report) if config.plan.shared else {}
    if shared and confirmations is None:  # the reports count the whole run, not our share
        risk, exact = (0, True) if shared["run"]["missing"] == 0 else \
            (min(lapsed, sent), False)
    lag = merged_lag(workers) if config.scheduled else None
    return {**cli.run_facts(config, UNLISTED_SETTINGS), **confirmation, **shared,
        "run_id": wire.run_label(run.run_id),
        "planned": config.planned,
        "sent": sent,
        "failed": sum(failed.values()),
        "failed_by_reason": failed,
        "flush_complete": flush.complete,
        "unflushed_at_most": flush.unflushed_at_most,
        "flush_s": round(flush.seconds, 3),
        "receiver_down_events": health.down_transitions,
        "receivers_never_up": [ep for ep in config.endpoints if ep not in health.seen_up],
        "endpoints": list(config.endpoints),
        "workers": config.workers,
        "duration_s": round(duration, 3),
        "sent_per_s": round(cli.rate(sent, duration), 1),
        "target_rate_msg_s": config.rate,
        "receiver_report": receiver_report,
        "gates": judge_gates(config, receiver_report),
        "send_lag_ms": lag.summary_ms() if lag else None,
        "send_lag_buckets": lag.buckets() if lag else None,
        "at_risk": risk,
        "at_risk_exact": exact,
    }


def shared_run(config, receiver_report):
    """{"run": ...}: the whole run of which this process is one instance (--instances), as
    the receivers' reports count it; received and missing are None without every report."""
    plan = config.plan
    every = receiver_report["receivers"] and "reason" not in receiver_report
    received = receiver_report["received"] if every else None
    listed = [text for entry in receiver_report.get("reports", ())
              for text in entry.get("missing_tasks") or () if isinstance(text, str)]
    first = plan.first_worker(config.workers)
    return {"run": {
        "name": plan.run_name,
        "instances": plan.instances,
        "instance": plan.instance,
        "workers": plan.run_workers(config.workers),
        "own_workers": [first + 1, first + config.workers],
        "planned": config.run_planned,
        "received": received,
        "missing": None if received is None else max(0, config.run_planned - received),
        "missing_tasks": listed[:RUN_MISSING_LISTED],
        "start_at": instances.iso_time(plan.start_ns) if plan.start_ns is not None else None,
        "reason": receiver_report.get("reason"),
    }}


def shared_run_rows(data):
    """The summary rows of the whole shared run: this instance's share, the run's verdict."""
    run = data["run"]
    rows = [("shared run", f"{run['name']}: instance {run['instance']} of {run['instances']},"
                           f" workers {run['own_workers'][0]}-{run['own_workers'][1]} of"
                           f" {run['workers']}")]
    if run["received"] is None:
        rows.append(("run verdict", f"unknown: {run['reason']}"))
        return rows
    rows.append(("run received", f"{run['received']}/{run['planned']} (every instance),"
                                 f" missing {run['missing']}"))
    if run["missing_tasks"]:
        rows.append(("run missing", ", ".join(run["missing_tasks"])))
    return rows


def shared_run_exit(data):
    """A shared run's exit status and reason, once this instance did its own part: the
    whole run's, since a loss anywhere fails every instance."""
    run = data["run"]
    if run["received"] is None:
        return SenderExit.NOT_ALL_SENT, f"the whole run's verdict is unknown: {run['reason']}"
    if run["missing"]:
        tasks = f" ({', '.join(run['missing_tasks'])})" if run["missing_tasks"] else ""
        return SenderExit.NOT_ALL_SENT, (f"the receivers report {run['received']} of the run's"
                                         f" {run['planned']} planned messages received:"
                                         f" {run['missing']} missing{tasks}")
    return SenderExit.OK, None


def sender_table(data):
    """The aligned table printed at exit."""
    rows = [("run", data["run_id"]), ("planned", data["planned"]), ("sent", data["sent"]),
            ("failed", data["failed"])]
    if "run" in data:
        rows[1:1] = shared_run_rows(data)
    rows += [(f"  {reason}", n) for reason, n in data["failed_by_reason"].items() if n]
    if "confirmed" in data:
        rows.append(("confirmed", f"{data['confirmed']}/{data['planned']} processed by a"
                                  " receiver (--confirm)"))
        rows.append(("resent", data["resent"]))
        rows.append(("unconfirmed", data["unconfirmed"]))
        for name, ranges in list(data["unconfirmed_ranges"].items())[:UNCONFIRMED_LISTED]:
            shown = ", ".join(ranges[:UNCONFIRMED_LISTED])
            more = (f" ... +{len(ranges) - UNCONFIRMED_LISTED} ranges"
                    if len(ranges) > UNCONFIRMED_LISTED else "")
            rows.append((f"  {name}", f"tasks {shown}{more}"))
        if len(data["unconfirmed_tasks"]) > UNCONFIRMED_LISTED:
            rows.append(("  ...", f"{len(data['unconfirmed_tasks'])} workers in all (see --json)"))
    if data["at_risk"]:
        rows.append(("at risk", f"{data['at_risk']} sent messages missing from the receivers'"
                                " reports" if data["at_risk_exact"] else
                     f"up to {data['at_risk']} sent messages may not have arrived: a receiver"
                     " was seen down, and the reports that count cannot say exactly"))
    rows.append(("flush", flush_text(data)))
    rows.append(("duration", f"{data['duration_s']:.2f} s"))
    target = data["target_rate_msg_s"]
    rows.append(("rate", f"{data['sent_per_s']:.1f} msg/s"
                 + (f" (--rate {target:g} msg/s)" if target else "")))
    if data.get("send_lag_ms") and data["send_lag_ms"]["max"] is not None:  # None: 0 sent
        lag = data["send_lag_ms"]
        rows.append(("send lag", f"p99 {lag['p99']:.3f} ms, max {lag['max']:.3f} ms"
                                 " (actual - intended send time)"))
    never_up = data["receivers_never_up"]
    rows.append(("receiver down", f"{data['receiver_down_events']} time(s) after it was up"
                 + (f"; never up: {', '.join(never_up)}" if never_up else "")))
    report_data = data["receiver_report"]
    if report_data["receivers"]:
        rows.append(("receiver", verdict.report_line(report_data)))
    if "reason" in report_data:
        rows.append(("receiver" if not report_data["receivers"] else "",
                     f"no report: {report_data['reason']}"))
    for refused in report_data.get("refused_reports", ()):
        rows.append(("refused report", f"{refused['endpoint']} instance {refused['instance']}:"
                                       f" {refused['reason']}; not counted"))
    for old in report_data.get("replaced_reports", ()):
        rows.append(("replaced report", f"{old['endpoint']} instance {old['instance']}"
                                        f" (received {old['received']}): a later instance"
                                        " reported; not counted, its part stays at risk"))
    if "inconsistent" in report_data:
        rows.append(("", f"reports not believed: {report_data['inconsistent']}"))
    if "confirmed" not in data:
        rows.append(("note", "'sent' = accepted by ZeroMQ while the receiver was connected; a"
                             " receiver that dies before reading them loses them (--confirm"
                             " knows)"))
    return cli.format_table("Sender summary", rows)


def flush_text(data):
    """The summary's flush row: complete, or what a flush cut short may have lost."""
    if data["flush_complete"]:
        return "complete"
    if data["at_risk_exact"] and not data["at_risk"]:
        return "TIMED OUT, but the receivers report every sent message received"
    return f"TIMED OUT: up to {data['unflushed_at_most']} sent messages may not have arrived"


def exit_reason(config, data, health, interrupted):
    """Exit status and a one-line reason when not every planned message was sent, or the
    receivers' own report says fewer arrived: read from the summary (`data`)."""
    sent, planned = data["sent"], data["planned"]
    if interrupted:
        return SenderExit.INTERRUPTED, f"interrupted: {sent} of {planned} messages sent"
    if "confirmed" in data:
        if data["confirmed"] < planned:
            return SenderExit.NOT_ALL_SENT, (f"only {data['confirmed']} of {planned} messages"
                                             " confirmed processed; see unconfirmed tasks")
        return SenderExit.OK, None
    if sent < planned:
        reasons = ", ".join(f"{n} {reason}" for reason, n in data["failed_by_reason"].items()
                            if n)
        return SenderExit.NOT_ALL_SENT, f"only {sent} of {planned} messages sent ({reasons})"
    if data["at_risk_exact"]:
        # Every receiver reported the run: plain PUSH/PULL cannot know what arrived, they
        # can (a receiver killed and restarted mid-run reports what its new life received).
        if data["at_risk"]:
            return SenderExit.NOT_ALL_SENT, (f"the receivers report {sent - data['at_risk']}"
                                             f" of the {sent} sent messages received:"
                                             f" {data['at_risk']} missing")
        return SenderExit.OK, None
    if data["at_risk"]:
        return SenderExit.NOT_ALL_SENT, (f"up to {data['at_risk']} of {sent} sent messages may"
                                         f" not have arrived: {silence(config, data, health)}")
    if not data["flush_complete"]:
        return SenderExit.NOT_ALL_SENT, (f"flush timed out after {config.timeout:g} s: up to"
                                         f" {data['unflushed_at_most']} messages not delivered")
    return SenderExit.OK, None


def silence(config, data, health):
    """Why sent messages may not have arrived, when the reports cannot say exactly."""
    report = data["receiver_report"]
    if report.get("inconsistent"):
        return report["inconsistent"]
    if report.get("refused_reports"):
        return "a receiver's report failed the checks (see refused report)"
    if report.get("replaced_reports"):
        return ("a new receiver instance replaced one that held part of the run (see"
                " replaced report)")
    silent = ", ".join(ep for ep in config.endpoints
                       if health.is_down(ep) and ep in health.seen_up)
    if silent:
        return f"{silent} went silent and never came back"
    lapsed = ", ".join(dict.fromkeys(ep for ep, _ in health.lapses))
    if lapsed:
        return (f"{lapsed} went down after it was handed messages, and no report of the"
                " receiver instance that held them says they arrived (a restart? a new"
                " instance does not speak for the old)")
    return "not every receiver reported what it got"
