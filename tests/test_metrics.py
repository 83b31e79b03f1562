"""Live metrics (issue 24): the Prometheus endpoint (--metrics-port), the HdrHistogram
interval log (--hlog) and the Grafana dashboard, with the real scripts."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RECEIVER, ROOT, SENDER, free_port, wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "pushpull.json"
HISTOGRAM_ERROR = 0.01  # latency.Histogram: a bucket's bound within 1 / 128 of its values
HDR_ERROR = 0.001  # the .hlog's HdrHistogram: 3 significant digits
MS_ROUNDING = 0.001  # the JSON rounds milliseconds to 3 decimals


def scrape(port, timeout=5):
    """GET /metrics with a real HTTP client; {sample name: [(labels, value)]} and the
    families."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode("utf-8")
    families = list(text_string_to_metric_families(text))
    samples = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples, families


def value(samples, name):
    """The one unlabelled sample `name`."""
    (labels, found), = samples[name]
    return found


def check_histograms(families):
    """Every histogram's cumulative buckets are monotone, and _count is its +Inf bucket."""
    for family in families:
        if family.type != "histogram":
            continue
        buckets = [(s.labels["le"], s.value) for s in family.samples
                   if s.name.endswith("_bucket")]
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), family.name
        assert buckets[-1][0] == "+Inf"
        count, = [s.value for s in family.samples if s.name.endswith("_count")]
        assert count == buckets[-1][1]
        assert 10 <= len(buckets) <= 30  # a bounded set of `le` bounds


def scrape_when(port, predicate, timeout, what):
    """Scrape until predicate(samples) holds; returns that scrape."""
    found = {}

    def attempt():
        try:
            found["scrape"] = scrape(port)
        except OSError:
            return False
        return predicate(found["scrape"][0])
    wait_until(attempt, timeout, what)
    return found["scrape"]


def read_hlog(path):
    """The .hlog read back with the hdrhistogram package's reader: {tag: [histograms]}."""
    from hdrh.histogram import HdrHistogram
    from hdrh.log import HistogramLogReader
    reader = HistogramLogReader(str(path), HdrHistogram(1, 86_400 * 10 ** 9, 3))
    tags = {}
    try:
        while True:
            interval = reader.get_next_interval_histogram()
            if interval is None:
                return tags
            tags.setdefault(interval.get_tag(), []).append(interval)
    finally:
        reader.close()


def merged(intervals):
    """One HdrHistogram of all `intervals`."""
    from hdrh.histogram import HdrHistogram
    total = HdrHistogram(1, 86_400 * 10 ** 9, 3)
    for interval in intervals:
        total.add(interval)
    return total


def assert_percentiles_agree(hdr, summary_ms):
    """p50/p90/p99 read back from the .hlog agree with the JSON's within both histograms'
    documented error."""
    for key, percentile in (("p50", 50), ("p90", 90), ("p99", 99)):
        ours = summary_ms[key]
        back = hdr.get_value_at_percentile(percentile) / 1e6
        assert abs(back - ours) <= ours * (HISTOGRAM_ERROR + HDR_ERROR) + MS_ROUNDING, \
            (key, back, ours)


def paced_pair(procs, tmp_path, receiver_args=(), sender_args=()):
    """A receiver and a paced sender, both with metrics and .hlog; returns both, the ports."""
    ports = free_port(), free_port()
    receiver = procs.receiver("--quiet", "--processing-time", "0", "--no-file-log",
                              "--stats-interval", "0.5", "--metrics-port", str(ports[0]),
                              "--hlog", str(tmp_path / "receiver.hlog"), *receiver_args)
    sender = procs.sender("--workers", "4", "--messages", "300", "--rate", "400", "--quiet",
                          "--stats-interval", "0.5", "--metrics-port", str(ports[1]),
                          "--hlog", str(tmp_path / "sender.hlog"), *sender_args,
                          endpoints=[receiver.endpoint])
    return receiver, sender, ports


def test_scraped_totals_equal_the_json_summaries_and_the_hlog_adds_up(procs, tmp_path):
    """Both endpoints scraped during a paced run and after its end: the counters equal the
    JSON summaries, the histograms count the messages measured; the .hlog's intervals add
    up to the run's and its percentiles agree with the JSON's; the dashboard's every
    metric is exported."""
    receiver, sender, (r_port, s_port) = paced_pair(procs, tmp_path)
    # During the run: both answer, with the run under way.
    during, r_families = scrape_when(r_port, lambda s: value(s, "pushpull_receiver_received_total")
                                     > 0, 20, "the receiver's metrics counting messages")
    s_during, s_families = scrape_when(s_port, lambda s: value(s, "pushpull_sender_sent_total")
                                       > 0, 20, "the sender's metrics counting messages")
    assert value(during, "pushpull_receiver_received_total") < 1200
    assert value(s_during, "pushpull_sender_target_rate") == 400
    assert s_during["pushpull_sender_receiver_up"] == [({"endpoint": receiver.endpoint}, 1.0)]
    check_histograms(r_families + s_families)
    # After the sender's report, before its exit: the summary's own figures.
    sender.wait_for_output(r"Sender summary", timeout=30)
    s_final, s_families = scrape(s_port)
    assert sender.wait(30) == 0
    s_json = sender.summary()
    for name, key in (("sent_total", "sent"), ("failed_total", "failed"),
                      ("at_risk", "at_risk"), ("planned", "planned"),
                      ("achieved_rate", "sent_per_s")):
        assert value(s_final, f"pushpull_sender_{name}") == s_json[key], name
    assert value(s_final, "pushpull_sender_send_lag_seconds_count") == s_json["sent"]
    check_histograms(s_families)
    # The receiver, once the run is reported, then stopped: its final figures.
    receiver.wait_for_output(r"\[RUN\] run", timeout=30)
    receiver.signal(signal.SIGINT)
    receiver.wait_for_output(r"Receiver summary", timeout=30)
    r_final, r_families = scrape(r_port)
    assert receiver.wait(30) == 0
    r_json = receiver.summary()
    for name in ("received", "processed", "invalid", "duplicates", "spilled",
                 "rejected_connections"):
        assert value(r_final, f"pushpull_receiver_{name}_total") == r_json[name], name
    run, = r_json["runs"]
    assert value(r_final, "pushpull_receiver_missing") == run["missing"] == 0
    assert value(r_final, "pushpull_receiver_latency_seconds_count") == \
        run["latency_samples"] == 1200
    check_histograms(r_families)
    # The .hlog files, read back by the hdrhistogram package.
    tags = read_hlog(tmp_path / "receiver.hlog")
    assert list(tags) == [run["run_id"]]
    assert len(tags[run["run_id"]]) >= 2  # several intervals of the ~3 s run
    latencies = merged(tags[run["run_id"]])
    assert latencies.get_total_count() == run["latency_samples"]
    assert_percentiles_agree(latencies, run["latency_ms"])
    lags = merged(read_hlog(tmp_path / "sender.hlog")[s_json["run_id"]])
    assert lags.get_total_count() == s_json["sent"]
    assert_percentiles_agree(lags, s_json["send_lag_ms"])
    # The dashboard queries only what the scripts export.
    exported = set(r_final) | set(s_final)
    queried = dashboard_metrics()
    assert queried and queried <= exported, queried - exported


def dashboard_metrics():
    """Every pushpull_* series the Grafana dashboard's queries name."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bpushpull_[a-z0-9_]+", expr)}


def test_the_endpoint_on_or_off_gives_the_same_figures(procs, tmp_path):
    """The same run with --metrics-port (scraped all along) and without: the same counts."""
    results = []
    for metrics in (True, False):
        port = free_port()
        extra = ("--metrics-port", str(port), "--metrics-hold", "0") if metrics else ()
        receiver = procs.receiver("--quiet", "--processing-time", "0", "--no-file-log", *extra)
        sender = procs.sender("--workers", "2", "--messages", "200", "--rate", "400",
                              "--quiet", endpoints=[receiver.endpoint])
        while metrics and sender.popen.poll() is None:  # scraped all along
            try:
                scrape(port)
            except OSError:
                pass
            time.sleep(0.05)
        assert sender.wait(30) == 0
        receiver.wait_for_output(r"\[RUN\] run", timeout=30)
        assert receiver.stop() == 0
        s_json, r_json = sender.summary(), receiver.summary()
        results.append((s_json["sent"], s_json["failed"], s_json["at_risk"],
                        r_json["received"], r_json["processed"], r_json["invalid"],
                        r_json["runs"][0]["missing"], r_json["runs"][0]["latency_samples"]))
    assert results[0] == results[1] == (400, 0, 0, 400, 400, 0, 0, 400)


def test_a_second_receiver_on_the_same_metrics_port_exits_2(procs):
    """The metrics port is taken: one clear line, exit 2, before any work."""
    port = free_port()
    first = procs.receiver("--quiet", "--no-file-log", "--metrics-port", str(port))
    second = procs.receiver("--quiet", "--no-file-log", "--metrics-port", str(port),
                            wait_ready=False)
    assert second.wait(30) == 2
    lines = second.output().strip().splitlines()
    assert len(lines) == 1 and "--metrics-port" in lines[0] and "in use" in lines[0], lines
    scrape(port)  # the first one still serves
    assert first.popen.poll() is None


def test_hostile_scrapers_neither_slow_nor_stop_the_run(procs, tmp_path):
    """Many connections at once, clients that connect and say nothing, one that trickles a
    byte at a time forever: the run delivers everything, scrapes are answered again once
    they are dropped, and Ctrl+C stops the receiver promptly."""
    port = free_port()
    receiver = procs.receiver("--quiet", "--processing-time", "0", "--no-file-log",
                              "--metrics-port", str(port), "--metrics-hold", "0")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    stop_trickle = threading.Event()
    trickler = threading.Thread(target=trickle, args=(port, stop_trickle), daemon=True)
    trickler.start()
    try:
        sender = procs.sender("--workers", "4", "--messages", "250", "--rate", "1000",
                              "--quiet", endpoints=[receiver.endpoint])
        for _ in range(200):  # a burst of connections, each closed at once
            socket.create_connection(("127.0.0.1", port)).close()
        assert sender.wait(30) == 0
        assert sender.summary()["sent"] == 1000
        receiver.wait_for_output(r"\[RUN\] run .* received 1000/1000", timeout=30)
        # The silent ones are dropped in time, the trickling one cut off: scrapes answer.
        scrape_when(port, lambda s: value(s, "pushpull_receiver_processed_total") == 1000,
                    30, "a scrape answered after the hostile clients")
        trickler2 = threading.Thread(target=trickle, args=(port, stop_trickle), daemon=True)
        trickler2.start()  # one more, in mid-request as the receiver stops
        receiver.signal(signal.SIGINT)
        assert receiver.wait(15) == 0
        assert receiver.summary()["processed"] == 1000
    finally:
        stop_trickle.set()
        for sock in silent:
            sock.close()


def trickle(port, stop):
    """A scraper that sends its request one byte every 0.2 s, and never finishes it."""
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            while not stop.wait(0.2):
                sock.send(b"G")
    except OSError:
        return  # cut off, or the receiver is gone


@pytest.mark.parametrize("script,flag,module,package", [
    (RECEIVER, "--metrics-port", "prometheus_client", "prometheus-client"),
    (SENDER, "--metrics-port", "prometheus_client", "prometheus-client"),
    (RECEIVER, "--hlog", "hdrh", "hdrhistogram"),
    (SENDER, "--hlog", "hdrh", "hdrhistogram"),
])
def test_a_missing_optional_package_exits_2_in_one_line(tmp_path, script, flag, module,
                                                        package):
    """With the flag and without the package: one line naming it and its install, exit 2."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / f"{module}.py").write_text("raise ImportError('not installed here')\n")
    argument = str(free_port()) if flag == "--metrics-port" else str(tmp_path / "x.hlog")
    done = subprocess.run([sys.executable, str(script), flag, argument], cwd=tmp_path,
                          env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and package in lines[0] and "pip install" in lines[0], lines


@pytest.mark.parametrize("script", [RECEIVER, SENDER])
def test_an_hlog_that_cannot_be_written_exits_2(tmp_path, script):
    """--hlog is checked at start, like --csv."""
    done = subprocess.run([sys.executable, str(script), "--hlog",
                           str(tmp_path / "absent" / "x.hlog")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--hlog" in done.stderr.splitlines()[-1]


def test_metrics_bind_is_an_address():
    """--metrics-bind takes an IP address or *, never a name the HTTP server cannot bind."""
    done = subprocess.run([sys.executable, str(RECEIVER), "--metrics-bind", "eth0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "not an IP address" in done.stderr


def test_a_histogram_read_while_it_is_written_is_always_well_formed():
    """The collector's copy of a histogram another thread keeps adding to: every read has
    monotone cumulative buckets, a count that never goes back, _count = +Inf."""
    from pushpull import latency, metrics
    histogram = latency.Histogram()
    stop = threading.Event()

    def write():
        value = 1
        while not stop.is_set():
            histogram.add_batch(10 ** 10, [10 ** 10 - (value * 7919 % 10 ** 9) - i
                                           for i in range(100)])
            value += 1

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    last = 0
    try:
        for _ in range(300):
            counts, _ = latency.snapshot([histogram])
            buckets, total = metrics.cumulative(counts)
            sums = [n for _, n in buckets]
            assert sums == sorted(sums) and buckets[-1][0] == "+Inf"
            assert sums[-1] == sum(counts.values()) >= last
            last = sums[-1]
            assert total >= 0
    finally:
        stop.set()
        writer.join(5)
    assert last > 0


def test_each_instance_of_processes_serves_its_own_port(procs):
    """--processes 2: instance K serves --metrics-port + K; their sums are the run's."""
    port = free_port()  # and port + 1, free too
    receiver = procs.receiver("--quiet", "--processing-time", "0", "--no-file-log")
    sender = procs.sender("--processes", "2", "--workers", "2", "--messages", "100",
                          "--rate", "400", "--quiet", "--metrics-port", str(port),
                          endpoints=[receiver.endpoint])
    final = {}

    def both_final():
        for instance in (0, 1):
            try:
                samples, _ = scrape(port + instance)
            except OSError:
                continue  # not started yet, or gone after its final scrape
            if "pushpull_sender_sent_total" not in samples:
                continue  # its workers are not started yet: nothing to expose
            if value(samples, "pushpull_sender_sent_total") == 200:
                final[instance] = samples
        return len(final) == 2
    wait_until(both_final, 40, "both instances' final figures")
    assert sender.wait(30) == 0
    assert sum(value(s, "pushpull_sender_sent_total") for s in final.values()) == \
        sender.summary()["sent"] == 400
    assert sum(value(s, "pushpull_sender_target_rate") for s in final.values()) == 400
    runs = {labels["run"] for s in final.values()
            for labels, _ in s["pushpull_sender_run_info"]}
    assert len(runs) == 1  # one run, the same id on both
