"""Issue 19: no peer, full disk or stop can fake the verdict: gates without a value,
figures without samples, logs on a full disk, stops at any moment, smaller lies."""

import json
import signal
import sys
import time

import pytest

from conftest import wait_until


def test_a_gate_with_no_samples_fails_and_no_percentile_reads_zero(procs):
    """Case 5: every message in the --warmup seconds: no latency sample. The p99 gate has
    no value and fails (exit 1, value null, and why); every percentile is null in the
    JSON and n/a in the text, never 0."""
    receiver = procs.receiver("--processing-time", "0")
    sender = procs.sender("--workers", "2", "--messages", "10", "--rate", "200", "--warmup",
                          "1000", "--max-p99", "0.001", endpoints=[receiver.endpoint])
    assert sender.wait(30) == 1, sender.output()[-2000:]
    (gate,) = sender.summary()["gates"]
    assert gate["value"] is None and not gate["passed"] and gate["reason"], gate
    assert sender.lines(r"\[GATE\] max-p99 FAILED: .*no value")
    line = receiver.wait_for_output(r"\[RUN\] run .*received 20/20")[0]
    assert "latency p50 n/a p99 n/a p99.9 n/a max n/a" in line, line
    assert receiver.stop() == 0
    got = receiver.summary()
    (entry,) = got["runs"]
    assert entry["latency_samples"] == 0
    for figures in (entry["latency_ms"], entry["latency_raw_ms"], got["latency_ms"]):
        assert set(figures.values()) == {None}, figures
    assert receiver.lines(r"  run [0-9a-f]{8} +20/20 .*p50 n/a, p99 n/a")
    assert "0.00 ms" not in receiver.output()
