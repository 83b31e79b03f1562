"""One run across many sender processes (issue 23): --instances, --run-id, --start-at,
--processes and the merge command, with the real scripts over real sockets.

Each instance runs its share of the workers of one run; the receivers must see, count
and report one run, and every instance must end with the whole run's verdict.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, load_script
from pushpull import instances, latency, schedule

RECEIVER_ARGS = ("--processing-time", "0", "--no-file-log", "--quiet")
INSTANCE_ARGS = ("--quiet", "--report-timeout", "20", "--stats-interval", "0.2")


def start_instances(procs, count, endpoints, *args, run_id=None):
    """`count` instances of one run, each with `args`; returns (run id, processes)."""
    run_id = run_id or str(uuid.uuid4())
    return run_id, [procs.sender(*INSTANCE_ARGS, *args, "--instances", str(count),
                                 "--instance", str(k), "--run-id", run_id,
                                 endpoints=endpoints, name=f"instance{k}")
                    for k in range(count)]


def run_entries(receiver):
    """Warm-stop a receiver; returns the runs of its JSON summary."""
    assert receiver.stop() == 0, receiver.output()[-2000:]
    return receiver.summary()["runs"]


def merge_cli(*args):
    """python3 -m pushpull.merge ARGS; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "pushpull.merge", *map(str, args)],
                          capture_output=True, text=True, timeout=30, cwd=str(ROOT))


@pytest.mark.parametrize("receivers", [1, 2])
def test_three_instances_make_one_run(procs, receivers):
    """3 instances: every receiver reports one run; planned = sent = received; all exit 0."""
    recv = [procs.receiver(*RECEIVER_ARGS, "--run-timeout", "20") for _ in range(receivers)]
    _, senders = start_instances(procs, 3, [r.endpoint for r in recv],
                                 "--workers", "2", "--messages", "200", "--delay", "0")
    for sender in senders:
        assert sender.wait() == 0, sender.output()[-3000:]
    labels = set()
    for k, sender in enumerate(senders):
        data = sender.summary()
        labels.add(data["run_id"])
        assert data["sent"] == data["planned"] == 400
        run = data["run"]
        assert run["instance"] == k and run["workers"] == 6
        assert run["own_workers"] == [2 * k + 1, 2 * k + 2]
        assert run["planned"] == run["received"] == 1200 and run["missing"] == 0, run
        assert data["receiver_report"]["receivers"] == receivers
        assert data["receiver_report"]["planned"] == 1200
        assert sender.lines(r"run received\s+1200/1200 \(every instance\), missing 0")
    assert len(labels) == 1
    shares = []
    for receiver in recv:
        runs = run_entries(receiver)
        assert [r["run_id"] for r in runs] == list(labels), runs
        assert runs[0]["workers"] == 6 and runs[0]["planned"] == 1200
        assert runs[0]["duplicates"] == 0
        shares.append(runs[0]["received"])
    assert sum(shares) == 1200, shares


def test_a_killed_instance_fails_every_instance(procs):
    """Instance 2 of 3 killed mid-run: the others exit 1, naming its workers' missing tasks."""
    receiver = procs.receiver(*RECEIVER_ARGS, "--run-timeout", "2")
    start = instances.iso_time(time.time_ns() + 2_000_000_000)
    _, senders = start_instances(procs, 3, [receiver.endpoint], "--workers", "2",
                                 "--messages", "300", "--rate", "600", "--start-at", start,
                                 "--report-timeout", "10")
    victim = senders[2]
    victim.wait_for_output(r"\[STATS\] sent ([5-9]\d|\d{3,})/600", timeout=30)
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    for sender in senders[:2]:
        assert sender.wait() == 1, sender.output()[-3000:]
        data = sender.summary()
        assert data["sent"] == data["planned"] == 600  # its own part was done
        run = data["run"]
        assert 0 < run["missing"] < 600 and run["received"] == 1800 - run["missing"], run
        assert run["missing_tasks"], run
        # Only the killed instance's workers (5 and 6) lack tasks.
        assert all(re.match(r"Pusher-(5|6|5\.\.6):", text) for text in run["missing_tasks"])
        exit_line = sender.lines(r"\[EXIT\]")[-1]
        assert f"{run['missing']} missing" in exit_line and "Pusher-" in exit_line, exit_line


def test_start_at_aligns_instances_started_apart(procs):
    """Instances started 2 s apart on one --start-at keep one schedule: the receiver's
    per-run rate is the run's --rate, and the late instance's send lag shows its lateness."""
    receiver = procs.receiver(*RECEIVER_ARGS, "--run-timeout", "20")
    start_ns = time.time_ns() + 1_500_000_000
    run_id = str(uuid.uuid4())
    args = ("--workers", "2", "--messages", "50", "--rate", "100",
            "--start-at", instances.iso_time(start_ns))
    early = procs.sender(*INSTANCE_ARGS, *args, "--instances", "2", "--instance", "0",
                         "--run-id", run_id, endpoints=[receiver.endpoint], name="early")
    time.sleep(2.0)  # the scenario: the second instance starts 2 s later, after the start
    late = procs.sender(*INSTANCE_ARGS, *args, "--instances", "2", "--instance", "1",
                        "--run-id", run_id, endpoints=[receiver.endpoint], name="late")
    assert early.wait() == 0, early.output()[-3000:]
    assert late.wait() == 0, late.output()[-3000:]
    late_lag, early_lag = late.summary()["send_lag_ms"], early.summary()["send_lag_ms"]
    # Its first message was due at the start; it could send only 0.5 s after at the soonest.
    assert late_lag["max"] >= 400, late_lag
    assert late_lag["max"] > early_lag["max"], (early_lag, late_lag)
    runs = run_entries(receiver)
    assert len(runs) == 1 and runs[0]["received"] == 200
    # 200 messages due over 2 s; the late instance's catch-up ends before the schedule does.
    assert 60 <= runs[0]["rate_msg_s"] <= 140, runs[0]
    assert runs[0]["latency_ms"]["max"] >= 400  # measured from the intended send times


def test_instance_schedules_are_one_process_schedule():
    """Instance K's workers, numbered run-wide, are due when one process's would be."""
    clock = schedule.Clock.now()
    whole = [schedule.worker_schedule(clock, n, 6, 300.0, 0.0, 0.0) for n in range(1, 7)]
    for k in range(3):
        plan = instances.Plan(3, k, "x" * 32, 1)
        for n in range(plan.first_worker(2) + 1, plan.first_worker(2) + 3):
            mine = schedule.worker_schedule(clock, n, plan.run_workers(2), 300.0, 0.0, 0.0)
            assert [mine.due(t) for t in range(5)] == [whole[n - 1].due(t) for t in range(5)]


def test_processes_make_one_combined_summary(procs):
    """--processes 2: one combined summary whose counts match the receiver's; exit 0."""
    receiver = procs.receiver(*RECEIVER_ARGS, "--run-timeout", "20")
    sender = procs.sender("--processes", "2", "--workers", "2", "--messages", "100",
                          "--rate", "1000", "--quiet", endpoints=[receiver.endpoint])
    assert sender.wait(45) == 0, sender.output()[-3000:]
    assert len(sender.lines(r"==== Run summary \(every instance\) ====")) == 1
    data = sender.summary()
    assert data["processes"] == 2 and data["exit_statuses"] == [0, 0]
    assert data["planned"] == data["sent"] == 400
    assert data["receiver_report"]["received"] == 400
    assert [s["run"]["instance"] for s in data["instances"]] == [0, 1]
    assert {s["run_id"] for s in data["instances"]} == {data["run_id"]}
    lag = latency.Histogram.from_buckets(data["send_lag_buckets"])
    assert lag.count == 400
    runs = run_entries(receiver)
    assert [(r["run_id"], r["received"]) for r in runs] == [(data["run_id"], 400)]


def test_ctrl_c_stops_every_process(procs):
    """Ctrl+C to --processes 2 stops both instances; one summary, exit 130."""
    receiver = procs.receiver(*RECEIVER_ARGS)
    sender = procs.sender("--processes", "2", "--workers", "1", "--messages", "1000",
                          "--rate", "20", "--quiet", endpoints=[receiver.endpoint])
    pids = [int(re.search(r"pid (\d+)", line)[1])
            for line in sender.wait_for_output(r"\[PROCESSES\] instance-\d: pid", 30, 2)]
    sender.wait_for_output(r"\[STATS\] sent [1-9]", 30, 2)  # both are sending
    sender.signal(signal.SIGINT)
    assert sender.wait(30) == 130, sender.output()[-3000:]
    data = sender.summary()
    assert data["exit_statuses"] == [130, 130] and 0 < data["sent"] < data["planned"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_merge_sums_two_instances_and_two_receivers(procs, tmp_path):
    """Two sender and two receiver summaries of one run merge to the run's totals, with
    histograms merged exactly; summaries of another run, or a damaged one, are refused."""
    recv = [procs.receiver(*RECEIVER_ARGS, "--run-timeout", "20") for _ in range(2)]
    _, senders = start_instances(procs, 2, [r.endpoint for r in recv], "--workers", "2",
                                 "--messages", "100", "--rate", "2000")
    for sender in senders:
        assert sender.wait() == 0, sender.output()[-3000:]
    entries = [run_entries(r)[0] for r in recv]
    files = [s.json_path for s in senders] + [r.json_path for r in recv]
    out = tmp_path / "merged.json"
    done = merge_cli(*files, "--json", out)
    assert done.returncode == 0, done.stdout + done.stderr
    merged = json.loads(out.read_text())
    assert merged["sent"] == merged["planned"] == 400
    assert merged["receiver"]["received"] == 400 and merged["verdict"]["passed"]
    whole = latency.Histogram()
    for entry in entries:
        whole.merge(latency.Histogram.from_buckets(entry["latency_buckets"]))
    assert whole.count == 400 and merged["receiver"]["latency_ms"] == whole.summary_ms()
    assert merged["send_lag_buckets"]["counts"] and "Merged run" in done.stdout

    other = json.loads(senders[0].json_path.read_text())
    other["run_id"] = "0badc0de"
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = merge_cli(senders[1].json_path, tmp_path / "other.json")
    assert refused.returncode == 2 and "different runs" in refused.stderr, refused.stderr
    (tmp_path / "damaged.json").write_text(senders[0].json_path.read_text()[:100])
    damaged = merge_cli(senders[0].json_path, tmp_path / "damaged.json")
    assert damaged.returncode == 2 and "damaged JSON" in damaged.stderr, damaged.stderr
    missing = merge_cli(senders[0].json_path, *[r.json_path for r in recv])
    assert missing.returncode == 1 and "1 of 2 sender instances" in missing.stdout


@pytest.mark.parametrize("args,reason", [
    (("--instances", "2"), "needs --run-id"),
    (("--run-id", str(uuid.uuid4())), "--run-id names a run shared"),
    (("--instances", "2", "--run-id", "nightly-loadtest-2026-12-07"), "is guessable"),
    (("--instances", "2", "--run-id", "0" * 32), "too repetitive"),
    (("--instances", "2", "--instance", "2", "--run-id", str(uuid.uuid4())), "is not 0 to 1"),
    (("--processes", "2", "--instances", "2"), "--processes starts its own"),
    (("--start-at", "tomorrow"), "not an ISO 8601 time"),
    (("--start-at", "+-5"), "+SECONDS is 0 to"),
])
def test_bad_shared_run_flags_exit_2(capsys, args, reason):
    """A shared run's bad flags: exit 2 with a one-line reason."""
    sender = load_script("async-socket-sender")
    with pytest.raises(SystemExit) as stop:
        sender.parse_args(list(args))
    assert stop.value.code == 2
    assert reason in capsys.readouterr().err


def test_run_id_rule_and_secret(monkeypatch):
    """A UUID passes without a secret; with PUSHPULL_RUN_SECRET any name does, and the
    secret changes the wire id; a weak secret is refused."""
    sender = load_script("async-socket-sender")
    name = str(uuid.uuid4())
    plain = sender.parse_args(["--instances", "2", "--run-id", name]).plan
    assert plain.wire_id == instances.wire_run_id(name) and plain.wire_id < 2 ** 63
    monkeypatch.setenv(instances.RUN_SECRET_ENV, "k3P9-zQ7x!vR2mW8yT4b")
    keyed = sender.parse_args(["--instances", "2", "--run-id", "nightly"]).plan
    assert keyed.wire_id == instances.wire_run_id("nightly", "k3P9-zQ7x!vR2mW8yT4b")
    assert keyed.wire_id != instances.wire_run_id("nightly")
    monkeypatch.setenv(instances.RUN_SECRET_ENV, "password")
    with pytest.raises(SystemExit):
        sender.parse_args(["--instances", "2", "--run-id", "nightly"])


def test_single_process_json_keeps_its_keys(procs):
    """A run of one writes no shared-run keys: its JSON is as it was, plus the buckets."""
    receiver = procs.receiver(*RECEIVER_ARGS)
    sender = procs.sender("--workers", "2", "--messages", "5", "--delay", "0.01", "--quiet",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0, sender.output()[-3000:]
    data = sender.summary()
    assert "run" not in data and "plan" not in data["config"]
    assert not sender.lines("shared run|instance")
    assert latency.Histogram.from_buckets(data["send_lag_buckets"]).count == 10


def test_confirm_with_instances(procs):
    """--confirm: each instance has its own workers confirmed and ignores the others'."""
    receiver = procs.receiver(*RECEIVER_ARGS, "--run-timeout", "20")
    _, senders = start_instances(procs, 2, [receiver.endpoint], "--workers", "2",
                                 "--messages", "150", "--delay", "0", "--confirm")
    for sender in senders:
        assert sender.wait() == 0, sender.output()[-3000:]
        data = sender.summary()
        assert data["confirmed"] == data["sent"] == 300 and data["unconfirmed"] == 0
        assert data["resent"] == 0 and data["run"]["received"] == 600


SENDER_STUB = {"run_id": "0000abcd", "sent": 10, "planned": 10, "failed": 0,
               "failed_by_reason": {}, "send_lag_buckets": None,
               "run": {"name": "r", "instances": 2, "instance": 0, "planned": 20}}


@pytest.mark.parametrize("damage", [
    {"run": {"name": "r", "instances": "two", "instance": 0, "planned": 20}},
    {"run": {"name": ["r"], "instances": 2, "instance": 0, "planned": 20}},
    {"failed": -1},
    {"send_lag_buckets": {"sub_buckets": 128, "max_ns": 5, "counts": [[10 ** 9, 1]]}},
    {"send_lag_buckets": {"sub_buckets": 64, "max_ns": 5, "counts": []}},
    {"run": {"name": "r", "instances": 2, "instance": [0], "planned": 20}},
])
def test_merge_refuses_damaged_summaries(tmp_path, damage):
    """Values of the wrong type or out of bounds: a one-line error, exit 2, no traceback."""
    from pushpull import merge
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(dict(SENDER_STUB, run=dict(SENDER_STUB["run"], instance=1))))
    bad.write_text(json.dumps({**SENDER_STUB, **damage}))
    with pytest.raises(merge.MergeError):
        merge.merge([good, bad])
    assert merge.main([str(good), str(bad)]) == 2


def test_instances_that_disagree_are_named_by_the_receiver(procs):
    """Two instances of one run with different --messages: the receiver drops the second
    one's frames with an [INVALID] line naming the case; neither instance exits 0."""
    receiver = procs.receiver("--processing-time", "0", "--no-file-log", "--run-timeout", "2")
    run_id = str(uuid.uuid4())
    senders = [procs.sender(*INSTANCE_ARGS, "--workers", "1", "--messages", str(messages),
                            "--delay", "0.01", "--instances", "2", "--instance", str(k),
                            "--run-id", run_id, "--report-timeout", "4",
                            endpoints=[receiver.endpoint], name=f"instance{k}")
               for k, messages in enumerate((20, 30))]
    receiver.wait_for_output(r"\[INVALID\] message dropped: run \w+: run fields differ from"
                             r" its first frame's \(sender instances that disagree", 30)
    assert [s.wait() for s in senders] == [1, 1]
