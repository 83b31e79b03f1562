"""--find-max: the highest rate the receivers sustain within the gates (docs/find-max.md).

The search is a series of steps, each a sender run of its own (its own run id, so
every receiver reports it apart) at one target rate. It doubles the rate while
every check holds, then bisects between the last rate that held and the first
that failed until they are within --precision percent.

A step is judged on the receivers' report of it, which comes once they processed
its last message; the next step starts only after it, so no step inherits the
last one's queue. The receivers measure latency on receipt, so a backlog in a
receiver's queue is not in latency_ms: the step's drain (its last report's
arrival, after its last message was due) says whether they processed at the rate.
"""

import dataclasses
import enum
from dataclasses import dataclass, field

from pushpull import cli, schedule, sender_summary, verdict, wire
from pushpull.sender_summary import SenderExit

FIND_MAX_STEPS = 40  # steps a search runs at most: doublings from the lowest rate, then bisection
SCHEDULE_TOLERANCE = 0.01  # fraction of the target rate the sender may fall short of
MIN_STEP_WARMUP = 0.2  # seconds of warmup a step has at least: its sockets connect in them
STALL_FLOOR = 0.1  # seconds a step's end may always be late, both ends: a busy machine's stall
MIN_PRECISION, MAX_PRECISION = 0.1, 100.0  # percent: --precision's range
MAX_STEP_DURATION = 3600.0  # seconds: the longest --step-duration
STEP_CSV_COLUMNS = ("step", "run_id", "target_msg_s", "achieved_msg_s", "planned", "sent",
                    "received", "missing", "latency_p50_ms", "latency_p99_ms",
                    "latency_max_ms", "send_lag_p99_ms", "drain_ms", "held", "failed", "limit")
SCALING_HINT = ("run more senders (--processes N, or --instances across hosts, where this"
                " version has them)")


class Check(enum.Enum):
    """What a step is judged on; the first two are the gates of the command line."""

    MAX_LOSS = "max-loss"  # the receivers' missing / planned, over --max-loss
    MAX_P99 = "max-p99"  # the receivers' p99 of latency_ms, over --max-p99
    DRAIN = "drain"  # the receivers processed the step's last message too late: a backlog
    SCHEDULE = "schedule"  # the sender's achieved rate fell short of the target
    SEND_LAG = "send-lag"  # the sender's send lag p99 over --max-p99
    NO_REPORT = "no-report"  # a receiver did not report the step


SENDER_CHECKS = (Check.SCHEDULE, Check.SEND_LAG)


class Side(enum.Enum):
    """Which end limited a step that failed."""

    RECEIVER = "receiver"
    SENDER = "sender"


class Outcome(enum.Enum):
    """How a search ended."""

    FOUND = "found"  # bracketed within --precision
    CEILING = "ceiling"  # held at the highest rate a step can send
    BELOW_START = "below_start"  # the first step failed
    NO_REPORT = "no_report"  # a step had no report: any further step could inherit its queue
    STEP_BOUND = "step_bound"  # FIND_MAX_STEPS ran out first
    INTERRUPTED = "interrupted"  # Ctrl+C


@dataclass(frozen=True)
class Failure:
    """One check a step failed: its figure, its limit (None for no-report) and why."""

    check: Check
    value: "float | None"
    limit: "float | None"
    text: str

    def to_json(self):
        """The failure as JSON."""
        return {"check": self.check.value, "value": self.value, "limit": self.limit,
                "reason": self.text}


@dataclass
class Step:
    """One step of the search: its run, the figures it was judged on, the verdict."""

    number: int
    run_id: str
    target: float  # msg/s
    achieved: float  # msg/s: sent / (the last task's send - the schedule's start)
    planned: int
    sent: int
    receiver_report: dict  # sender_summary.receiver_verdict(): the receivers' reports merged
    send_lag: dict  # ms
    drain_ms: "float | None"  # last report's arrival - the last message's due time
    late_end_s: float = 0.0  # the last task's send - its due time
    interrupted: bool = False
    failures: list = field(default_factory=list)
    side: "Side | None" = None

    @property
    def held(self):
        """True when every check held."""
        return not self.failures and not self.interrupted

    @property
    def latency(self):
        """The receivers' latency_ms (merged), {} without a report."""
        return self.receiver_report.get("latency_ms", {}) if self.receiver_report["receivers"] \
            else {}

    def loss_percent(self):
        """Missing / planned in percent, by the receivers' report; None without one."""
        if not self.receiver_report["receivers"]:
            return None
        return verdict.Gate("max-loss", 0).value(self.receiver_report)

    def verdict_text(self):
        """'held', 'interrupted', or 'FAILED max-p99 (...); drain (...) [sender]'."""
        if self.interrupted:
            return "interrupted"
        if self.held:
            return "held"
        side = " [sender was the limit]" if self.side is Side.SENDER else ""
        return "FAILED " + "; ".join(f"{f.check.value} ({f.text})" for f in self.failures) + side

    def figures(self):
        """The step's figures in a few words, for its [STEP] line and its table row."""
        report = self.receiver_report
        received = (f"received {report['received']}/{self.planned}, missing {report['missing']}"
                    if report["receivers"] else "no report")
        lat = self.latency
        latency_text = " ".join(f"{key} {lat[key]:.2f}" for key in ("p50", "p99", "max")
                                if key in lat) + " ms" if lat else "no latency"
        return (f"target {self.target:.1f} msg/s, achieved {self.achieved:.1f} msg/s"
                f" | {received} | {latency_text}")

    def line(self):
        """The [STEP] line."""
        return f"[STEP] {self.number}: {self.figures()} | {self.verdict_text()}"

    def to_json(self):
        """The step's entry in the find_max JSON."""
        return {"step": self.number, "run_id": self.run_id, "target_msg_s": self.target,
                "achieved_msg_s": round(self.achieved, 1), "planned": self.planned,
                "sent": self.sent, "receiver_report": self.receiver_report,
                "send_lag_ms": self.send_lag, "drain_ms": self.drain_ms,
                "loss_percent": self.loss_percent(), "held": self.held,
                "interrupted": self.interrupted,
                "failed": [f.to_json() for f in self.failures],
                "limit": self.side.value if self.side else None}

    def csv_row(self):
        """The step's row of the steps CSV (STEP_CSV_COLUMNS)."""
        report, lat = self.receiver_report, self.latency
        return (self.number, self.run_id, self.target, round(self.achieved, 1), self.planned,
                self.sent, report.get("received", ""), report.get("missing", ""),
                lat.get("p50", ""), lat.get("p99", ""), lat.get("max", ""),
                self.send_lag.get("p99", ""), "" if self.drain_ms is None else self.drain_ms,
                self.held, " ".join(f.check.value for f in self.failures),
                self.side.value if self.side else "")


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------
def add_flags(parser, find_max, step_duration, precision, start_rate):
    """--find-max, --step-duration, --precision; the defaults are the script's constants."""
    parser.add_argument("--find-max", action="store_true", default=find_max,
                        help="search the highest rate the receivers sustain within the gates"
                             " (--max-p99, --max-loss), from --rate or"
                             f" {start_rate:g} msg/s (FIND_MAX, FIND_MAX_START_RATE)")
    parser.add_argument("--step-duration", metavar="SECONDS", default=step_duration,
                        type=cli.seconds(cli.MIN_INTERVAL, MAX_STEP_DURATION),
                        help="seconds each --find-max step sends, after --warmup"
                             " (STEP_DURATION)")
    parser.add_argument("--precision", metavar="PERCENT", default=precision,
                        type=cli.number(MIN_PRECISION, MAX_PRECISION, "percent"),
                        help="--find-max stops when the rates that held and failed are"
                             " within PERCENT (FIND_MAX_PRECISION)")


def check_flags(parser, args, start_rate):
    """With --find-max: exit 2 (parser.error) on what a search cannot run with; sets
    args.rate to the first step's rate."""
    if not args.find_max:
        return
    if args.max_p99 is None and args.max_loss is None:
        parser.error("--find-max needs a gate to search against: --max-p99 MS and/or"
                     " --max-loss PERCENT")
    for flag, value in (("--duration", args.duration), ("--confirm", args.confirm or None)):
        if value is not None:
            parser.error(f"--find-max cannot be used with {flag} (each step sends"
                         " --step-duration seconds, open loop)")
    for flag, value in (("--instances", args.instances), ("--processes", args.processes)):
        if value > 1:
            parser.error(f"--find-max cannot be used with {flag} (each step is a run of"
                         " this one process)")
    args.rate = args.rate or start_rate
    span = max(args.warmup, MIN_STEP_WARMUP) + args.step_duration
    if schedule.messages_for_duration(span, args.workers, args.rate, 0.0) < 1:
        parser.error(f"--find-max: {args.rate:g} msg/s for {span:g} s is less than one"
                     f" message for each of the {args.workers} workers: raise --rate or"
                     " --step-duration")


# ---------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------
def step_config(config, rate):
    """The Config of one step at `rate`: --warmup (at least MIN_STEP_WARMUP: the first
    messages wait for the workers' connections, a delay that is not the rate's) then
    --step-duration of schedule; no per-message lines, no per-run files, and time for the
    receivers to drain a backlog as long as the step before their report is given up on."""
    warmup = max(config.warmup, MIN_STEP_WARMUP)
    span = step_span(config)
    messages = max(1, schedule.messages_for_duration(span, config.workers, rate, 0.0))
    return dataclasses.replace(config, rate=rate, delay=0.0, messages=messages, duration=span,
                               warmup=warmup,
                               quiet=True, json_path=None, csv_path=None, hlog=None,
                               report_timeout=config.report_timeout + span)


def step_span(config):
    """Seconds of schedule one step sends: its warmup and --step-duration."""
    return max(config.warmup, MIN_STEP_WARMUP) + config.step_duration


def allowance_s(span):
    """Seconds the receivers may take after a step's last message was due to report it:
    SCHEDULE_TOLERANCE of the step (a backlog of more means they processed the step more
    than that fraction slower than its rate, as the sender's own check), at least
    STALL_FLOOR (the last message's processing and its report's way back, on a busy
    machine). Also how late the sender's last task may leave."""
    return max(SCHEDULE_TOLERANCE * span, STALL_FLOOR)


def judge(config, number):
    """send_run's judge for step `number`: measures the run and returns its Step."""
    def measure(run, workers, channel, interrupted):
        clock = workers[0].schedule.clock
        # The end of sending: the last task handed to ZeroMQ (END frames are not the rate).
        ended = max((w.sent_until for w in workers if w.sent_until is not None),
                    default=clock.monotonic)
        sent = sum(w.tally.sent for w in workers)
        receiver_report = sender_summary.receiver_verdict(config, channel, sent)
        reported_at = (max(s.reported_at for s in channel.sources)
                       if channel.all_reported() else None)
        last_due = clock.monotonic + (config.planned - 1) / config.rate
        step = Step(number, wire.run_label(run.run_id), config.rate,
                    cli.rate(sent, ended - clock.monotonic), config.planned, sent,
                    receiver_report, sender_summary.merged_lag(workers).summary_ms(),
                    None if reported_at is None else round((reported_at - last_due) * 1000, 3),
                    ended - last_due, interrupted)
        if not interrupted:
            step.failures = failures(config, step)
            step.side = limiting_side(config, step, reported_at, ended)
        return step
    return measure


def failures(config, step):
    """The checks `step` failed: the receivers' gates and drain, the sender's schedule."""
    found, report = [], step.receiver_report
    if "reason" in report:
        found.append(Failure(Check.NO_REPORT, None, None, report["reason"]))
    else:
        for record in sender_summary.judge_gates(config, report):
            if not record["passed"]:
                unit = sender_summary.GATE_UNITS[record["name"]]
                text = (f"{record['value']:g} {unit} > {record['limit']:g} {unit}"
                        if record["value"] is not None else record["reason"])
                found.append(Failure(Check(record["name"]), record["value"], record["limit"],
                                     text))
        allowed_ms = allowance_s(config.duration) * 1000
        if step.drain_ms is not None and step.drain_ms > allowed_ms:
            found.append(Failure(Check.DRAIN, step.drain_ms, round(allowed_ms, 3),
                                 f"processed {step.drain_ms:.0f} ms after the last message"
                                 f" was due > {allowed_ms:g} ms: a backlog"))
    floor = step.target * (1 - SCHEDULE_TOLERANCE)
    if step.achieved < floor and step.late_end_s > STALL_FLOOR:
        found.append(Failure(Check.SCHEDULE, round(step.achieved, 1), round(floor, 1),
                             f"sent {step.achieved:.1f} msg/s < {floor:.1f}"))
    lag_p99 = step.send_lag.get("p99")
    if config.max_p99 is not None and lag_p99 is not None and lag_p99 > config.max_p99:
        found.append(Failure(Check.SEND_LAG, lag_p99, config.max_p99,
                             f"send lag p99 {lag_p99:g} ms > {config.max_p99:g} ms"))
    return found


def limiting_side(config, step, reported_at, ended):
    """Who limited a failed step: the sender when it fell behind its own schedule while
    the receivers kept up with what it did send (their reports came within the allowance
    of its actual end of sending); else the receivers."""
    if not step.failures:
        return None
    behind = any(f.check in SENDER_CHECKS for f in step.failures)
    if behind and reported_at is not None \
            and reported_at - ended <= allowance_s(config.duration):
        return Side.SENDER
    return Side.RECEIVER


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------
@dataclass
class Search:
    """The steps so far, and the bracket: the highest rate that held, the lowest that failed."""

    config: object
    steps: list = field(default_factory=list)
    held: "Step | None" = None  # the best step that held
    failed: "Step | None" = None  # the lowest step that failed
    outcome: "Outcome | None" = None

    def ceiling(self):
        """The highest rate a step may send: --rate's bound, and what a run can count."""
        return min(cli.MAX_RATE, cli.MAX_RUN_MESSAGES / step_span(self.config))

    def add(self, step):
        """Record a judged step; returns the next rate, or None with `outcome` set."""
        self.steps.append(step)
        if step.interrupted:
            self.outcome = Outcome.INTERRUPTED
        elif step.held:
            if self.held is None or step.target > self.held.target:
                self.held = step
        elif self.failed is None or step.target < self.failed.target:
            self.failed = step
        if self.outcome is None:
            self.outcome = self.stop_reason(step)
        return None if self.outcome else self.next_rate()

    def stop_reason(self, step):
        """Why the search ends after `step`, or None to go on."""
        if Check.NO_REPORT in {f.check for f in step.failures}:
            return Outcome.NO_REPORT
        if self.held is None and self.failed is not None:
            return Outcome.BELOW_START
        if self.failed is None and self.held.target >= self.ceiling():
            return Outcome.CEILING
        if self.failed is not None and \
                self.failed.target - self.held.target <= \
                self.held.target * self.config.precision / 100:
            return Outcome.FOUND
        if len(self.steps) >= FIND_MAX_STEPS:
            return Outcome.STEP_BOUND
        return None

    def next_rate(self):
        """Double while every step held, then bisect the bracket."""
        if self.failed is None:
            return min(self.held.target * 2, self.ceiling())
        return round((self.held.target + self.failed.target) / 2, 3)

    def exit_status(self):
        """0 with an answer, 130 on Ctrl+C, else 1."""
        if self.outcome is Outcome.INTERRUPTED:
            return SenderExit.INTERRUPTED
        if self.outcome in (Outcome.FOUND, Outcome.CEILING):
            return SenderExit.OK
        return SenderExit.NOT_ALL_SENT

    def limit(self):
        """Which side limited the search: that of the lowest failed step, if any."""
        return self.failed.side if self.failed is not None else None

    def to_json(self):
        """The find_max object of the --json summary."""
        best = self.held
        return {"outcome": self.outcome.value if self.outcome else None,
                "max_rate_msg_s": best.target if best else None,
                "first_failed_msg_s": self.failed.target if self.failed else None,
                "limit": self.limit().value if self.limit() else None,
                "answer": answer_json(self.config, best),
                "gates": {"max_p99_ms": self.config.max_p99,
                          "max_loss_percent": self.config.max_loss},
                "start_rate_msg_s": self.config.rate, "precision_percent":
                    self.config.precision, "step_duration_s": self.config.step_duration,
                "warmup_s": self.config.warmup, "steps": [s.to_json() for s in self.steps]}


def answer_json(config, best):
    """The best step's figures against the gates, or None."""
    if best is None:
        return None
    return {"rate_msg_s": best.target, "achieved_msg_s": round(best.achieved, 1),
            "p99_ms": best.latency.get("p99"), "loss_percent": best.loss_percent(),
            "run_id": best.run_id, "step": best.number}


def search(send_run, config, signals, log):
    """--find-max: run steps until the bracket is within --precision; returns the exit status."""
    found = Search(config)
    rate = config.rate
    log.info(f"[FIND-MAX] searching from {rate:g} msg/s: steps of {config.step_duration:g} s"
             f"{f' after {config.warmup:g} s warmup' if config.warmup else ''}, to within"
             f" {config.precision:g} %, gates: {gates_text(config)}")
    while rate is not None:
        if signals.first.is_set():  # Ctrl+C between two steps
            found.outcome = Outcome.INTERRUPTED
            break
        step_cfg = step_config(config, rate)
        step = send_run(step_cfg, signals, log, judge=judge(step_cfg, len(found.steps) + 1))
        if not isinstance(step, Step):  # the run could not start
            log.error("[FIND-MAX] a step could not start; the search ends")
            found.outcome = Outcome.NO_REPORT
            break
        (log.info if step.held else log.warning)(step.line())
        rate = found.add(step)
    return finish(found, log)


def gates_text(config):
    """'p99 <= 50 ms, loss <= 1 %'."""
    parts = []
    if config.max_p99 is not None:
        parts.append(f"p99 <= {config.max_p99:g} ms")
    if config.max_loss is not None:
        parts.append(f"loss <= {config.max_loss:g} %")
    return ", ".join(parts)


def finish(found, log):
    """The table, the answer line, the JSON and CSV; returns the exit status."""
    if found.steps:
        log.info("\n" + steps_table(found.steps))
    for line in answer_lines(found):
        (log.info if found.exit_status() == SenderExit.OK else log.error)(line)
    saved = save(found, log)
    status = found.exit_status()
    if status == SenderExit.OK and not saved:
        log.error("[EXIT] the --find-max results could not be written")
        return SenderExit.NOT_ALL_SENT
    return status


def steps_table(steps):
    """Every step in an aligned table: its figures and verdict."""
    return cli.format_table("Capacity search (--find-max)",
                            [(f"step {s.number}", f"{s.figures()} | {s.verdict_text()}")
                             for s in steps])


def answer_lines(found):
    """The answer line (max sustainable rate: ...) and why the search ended."""
    config, best, failed = found.config, found.held, found.failed
    outcome = found.outcome
    lines = []
    if outcome is Outcome.BELOW_START:
        lines.append(f"max sustainable rate: below the start rate of {failed.target:g} msg/s"
                     f" (step {failed.number} {failed.verdict_text()})")
    elif best is not None:
        lines.append(f"max sustainable rate: {best.target:g} msg/s"
                     f" ({answer_figures(config, best)})")
    else:
        last = found.steps[-1] if found.steps else None
        lines.append("max sustainable rate: not found" + (
            f" (step {last.number} {last.verdict_text()})" if last else " (no step ran)"))
    if failed is not None and failed.side is Side.SENDER:
        lines.append(f"[FIND-MAX] the sender, not the receiver, was the limit at"
                     f" {failed.target:g} msg/s (achieved {failed.achieved:.1f} msg/s): the"
                     f" receivers may take more; {SCALING_HINT}")
    why = {Outcome.FOUND: f"the rates that held and failed are within {config.precision:g} %",
           Outcome.CEILING: f"held at {found.ceiling():g} msg/s, the highest rate a step sends",
           Outcome.NO_REPORT: "a step had no report from a receiver; a next step could inherit"
                              " its queue",
           Outcome.STEP_BOUND: f"{FIND_MAX_STEPS} steps ran before the rates were within"
                               f" {config.precision:g} %",
           Outcome.INTERRUPTED: "interrupted"}.get(outcome)
    if why:
        best_text = f"{best.target:g} msg/s" if best else "none"
        lines.append(f"[FIND-MAX] search ended after {len(found.steps)} step(s): {why};"
                     f" best rate so far {best_text}")
    return lines


def answer_figures(config, best):
    """'p99 0.52 ms <= 50, loss 0 <= 1' for the gates given."""
    parts = []
    if config.max_p99 is not None:
        parts.append(f"p99 {best.latency.get('p99', 0):g} ms <= {config.max_p99:g}")
    if config.max_loss is not None:
        parts.append(f"loss {best.loss_percent():g} <= {config.max_loss:g}")
    return ", ".join(parts)


def steps_csv_path(csv_path):
    """--csv FILE under --find-max: the steps go to FILE's stem + .steps.csv."""
    stem = csv_path[:-4] if csv_path.lower().endswith(".csv") else csv_path
    return f"{stem}.steps.csv"


def save(found, log):
    """--json: the summary with its find_max object; --csv: one row per step. False if
    either could not be written (said in the log)."""
    config, ok = found.config, True
    if config.json_path:
        data = {**cli.run_facts(config, sender_summary.SECRET_SETTINGS),
                "find_max": found.to_json()}
        ok = cli.save_summary(config.json_path, data, log)
    if config.csv_path:
        path = steps_csv_path(config.csv_path)
        try:
            with cli.CsvSeries(path, STEP_CSV_COLUMNS) as series:
                for step in found.steps:
                    series.row(step.csv_row())
        except OSError as exc:
            log.error(f"[ERROR] cannot write the steps CSV {path}: {exc.strerror}")
            ok = False
    return ok
