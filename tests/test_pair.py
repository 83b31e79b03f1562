"""The pair end to end with the seed's shape: counts, [RUN] line, exit codes."""


def test_seed_shaped_run_is_fully_accounted(procs):
    receiver = procs.receiver("--processing-time", "0.001")
    sender = procs.sender("--workers", "5", "--messages", "4", "--delay", "0.01",
                          endpoints=[receiver.endpoint])
    assert sender.wait() == 0
    run_line = receiver.wait_for_output(r"\[RUN\]")[0]
    assert "received 20/20" in run_line and "missing 0" in run_line
    assert receiver.stop() == 0
    summary = receiver.summary()
    assert (summary["received"], summary["processed"], summary["spilled"]) == (20, 20, 0)
    assert summary["runs"][0]["planned"] == 20 and summary["runs"][0]["missing"] == 0
    assert sender.summary()["sent"] == 20
