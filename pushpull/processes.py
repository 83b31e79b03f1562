"""--processes P: P sender instances of one run as child processes, and one combined summary.

The children are started with multiprocessing's spawn method (as on Windows: no
fork), each as `--instances P --instance K` of one --run-id, with one --start-at,
so their schedules are the one schedule of a single process with P x W workers.
Each writes its --json summary to a temporary file; this process sums them
(pushpull.merge) and prints the combined summary. Ctrl+C here stops them all.
"""

import contextlib
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import tempfile
import time

from pushpull import cli, instances, merge, verdict
from pushpull.sender_summary import UNLISTED_SETTINGS, SenderExit

# A spawned Python importing pyzmq starts in about 0.3 s on an idle machine; a child
# that starts later still keeps the schedule (its late messages go at once, its send
# lag shows it).
PROCESS_START_LEAD = 2.0  # seconds from the start of --processes to its instances' start
CHILD_POLL = 0.1  # seconds between checks of the children (and of Ctrl+C)
CHILD_STOP_TIMEOUT = 10.0  # seconds a child told to end (SIGTERM) has before it is killed
RUN_NAME_BYTES = 16  # random bytes of the --run-id made for the children (32 hex digits)


def child_main(script, argv):
    """A child's body: the sender script's main() with `argv`, as one instance."""
    if hasattr(os, "setsid"):  # POSIX: the terminal's Ctrl+C reaches the parent alone,
        os.setsid()  # which passes it on once (twice would stop the child at once)
    spec = importlib.util.spec_from_file_location("pushpull_sender_instance", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    sys.exit(module.main(argv))


def numbered(path, index):
    """PATH.csv -> PATH.K.csv: a child's own file where the user named one for the run."""
    root, ext = os.path.splitext(path)
    return f"{root}.{index}{ext}"


def child_argv(argv, config, index, run_name, start_ns, json_path):
    """The command line of instance `index`: the user's, then what makes it that instance
    (argparse keeps the last value of a flag given twice)."""
    extra = ["--processes", "1", "--instances", str(config.plan.processes),
             "--instance", str(index), "--run-id", run_name,
             "--start-at", instances.iso_time(start_ns), "--json", json_path]
    if config.csv_path:
        extra += ["--csv", numbered(config.csv_path, index)]
    if config.log_file:
        extra += ["--log-file", numbered(config.log_file, index)]
    if config.metrics_port is not None:  # one endpoint per instance (docs/metrics.md)
        extra += ["--metrics-port", str(config.metrics_port + index)]
    if config.hlog:
        extra += ["--hlog", numbered(config.hlog, index)]
    return [*argv, *extra]


def run_instances(script, argv, config, signals, log):
    """Start the children, wait for them (passing Ctrl+C on), print the combined summary;
    returns the one exit status."""
    count = config.plan.processes
    run_name = config.plan.run_name or secrets.token_hex(RUN_NAME_BYTES)
    start_ns = config.plan.start_ns
    if start_ns is None:
        start_ns = time.time_ns() + int(PROCESS_START_LEAD * 1e9)
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pushpull-instances-") as scratch:
        paths = [os.path.join(scratch, f"instance-{k}.json") for k in range(count)]
        children = [spawn.Process(target=child_main, name=f"instance-{k}", args=(
            script, child_argv(argv, config, k, run_name, start_ns, paths[k])))
            for k in range(count)]
        log.info(f"[PROCESSES] run {run_name!r}: {count} instances of {config.workers}"
                 f" workers, starting at {instances.iso_time(start_ns)}")
        try:
            for child in children:
                child.start()
                log.info(f"[PROCESSES] {child.name}: pid {child.pid}")
            wait_for_children(children, signals, log)
        finally:
            for child in children:
                if child.is_alive():  # only after an unexpected error here
                    child.terminate()
                    child.join(CHILD_STOP_TIMEOUT)
                if child.is_alive():
                    child.kill()
                child.join(CHILD_STOP_TIMEOUT)
        summaries = [read_summary(path) for path in paths]
    statuses = [child.exitcode for child in children]
    data = combined_data(config, run_name, summaries, statuses)
    log.info("\n" + combined_table(data))
    status, reason = combined_exit(data, signals.first.is_set())
    data["exit_status"] = int(status)
    if config.json_path and not cli.save_summary(config.json_path, data, log):
        status, reason = SenderExit.NOT_ALL_SENT, "the --json summary could not be written"
    if reason:
        log.error(f"[EXIT] {reason}")
    return status


def wait_for_children(children, signals, log):
    """Wait until every child has exited; each Ctrl+C here is passed on to them once."""
    passed_on = 0
    while any(child.is_alive() for child in children):
        wanted = 2 if signals.second.is_set() else 1 if signals.first.is_set() else 0
        if wanted > passed_on:
            passed_on = wanted
            if passed_on == 1:
                log.warning("[STOP] interrupted: stopping every instance (Ctrl+C again to"
                            " make them exit at once)")
            for child in children:
                if child.is_alive() and hasattr(os, "setsid"):  # else the console told them
                    with contextlib.suppress(ProcessLookupError):  # it has just exited
                        os.kill(child.pid, signal.SIGINT)
        multiprocessing.connection.wait([c.sentinel for c in children if c.is_alive()],
                                        CHILD_POLL)


def read_summary(path):
    """A child's --json summary, or None if it wrote none (it failed before its end)."""
    try:
        with open(path, encoding="utf-8") as src:
            return json.load(src)
    except (OSError, ValueError):
        return None


def combined_data(config, run_name, summaries, statuses):
    """The combined summary (JSON): the instances' sums, the receivers' report, each instance's."""
    written = [(f"instance {k}", s) for k, s in enumerate(summaries) if s is not None]
    sums = merge.combine_senders(written) if written else {}
    reports = [s["receiver_report"] for _, s in written]
    # Every instance heard the same receivers' reports of the run: the fullest is kept.
    report = max(reports, key=lambda r: (r.get("receivers", 0), "reason" not in r),
                 default={"receivers": 0, "reason": "no instance wrote a summary"})
    return {
        **cli.run_facts(config, UNLISTED_SETTINGS),
        "run_id": sums.get("run_id"),
        "run_name": run_name,
        "processes": config.plan.processes,
        "planned": config.run_planned,
        "sent": sums.get("sent", 0),
        "failed": sums.get("failed", 0),
        "failed_by_reason": sums.get("failed_by_reason", {}),
        "send_lag_ms": sums.get("send_lag_ms"),
        "send_lag_buckets": sums.get("send_lag_buckets"),
        "receiver_report": report,
        "exit_statuses": statuses,
        "instances": summaries,
    }


def combined_table(data):
    """The combined summary as an aligned table."""
    rows = [("run", f"{data['run_id']} ({data['run_name']}), {data['processes']} processes"),
            ("planned", data["planned"]), ("sent", f"{data['sent']} (every instance)"),
            ("failed", data["failed"])]
    rows += [(f"  {reason}", n) for reason, n in data["failed_by_reason"].items() if n]
    if data["send_lag_ms"]:
        lag = data["send_lag_ms"]
        rows.append(("send lag", f"p99 {lag['p99']:.3f} ms, max {lag['max']:.3f} ms (every"
                                 " instance, merged)"))
    report = data["receiver_report"]
    if report.get("receivers"):
        rows.append(("receiver", verdict.report_line(report)))
    if "reason" in report:
        rows.append(("receiver" if not report.get("receivers") else "",
                     f"no report: {report['reason']}"))
    for k, (summary, status) in enumerate(zip(data["instances"], data["exit_statuses"])):
        sent = "wrote no summary" if summary is None else f"sent {summary['sent']}"
        rows.append((f"instance {k}", f"{sent}, exit {status}"))
    return cli.format_table("Run summary (every instance)", rows)


def combined_exit(data, interrupted):
    """The one exit status (and its reason) of the run the children shared."""
    statuses = data["exit_statuses"]
    if interrupted:
        return SenderExit.INTERRUPTED, (f"interrupted: {data['sent']} of {data['planned']}"
                                        " messages sent")
    if all(status == SenderExit.OK for status in statuses):
        return SenderExit.OK, None
    failed = [f"instance {k} exited {s}" for k, s in enumerate(statuses) if s != SenderExit.OK]
    return SenderExit.NOT_ALL_SENT, f"{', '.join(failed)} (see its [EXIT] line above)"
