"""The receiver's package pieces on their own: spill file, run ledger, confirmations, queue."""

import logging
import random
import time

import pytest
import zmq

import conftest  # noqa: F401  (puts the project root on sys.path)
from pushpull import confirm, flow, logs, runs, spill, wire


class Lines(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class Counters:
    """The totals a RunLedger writes."""

    processed = duplicates = plain = 0


@pytest.fixture
def log():
    """A logger whose lines the test can read (log.lines.messages)."""
    logger = logging.getLogger(f"test-{random.getrandbits(32)}")
    logger.propagate = False
    logger.lines = Lines()
    logger.addHandler(logger.lines)
    logger.setLevel(logging.INFO)
    return logger


def run_frames(workers, per_worker, confirm_run=False):
    """The encoder of each worker of a new run: {worker: MessageEncoder}."""
    run = wire.RunInfo(random.getrandbits(63), workers, per_worker, 1, confirm_run)
    return {w: wire.MessageEncoder(run, w, 1, 2) for w in range(1, workers + 1)}


def test_spill_file_round_trip(tmp_path):
    """save() then load() gives the same messages back; remove() deletes the file once."""
    path = str(tmp_path / "spill.bin")
    assert spill.load(path) == ([], 0)  # no spill file: nothing to recover
    encoders, cache = run_frames(2, 3), {}
    messages = [wire.decode(encoders[w].data(t), cache) for w in (1, 2) for t in range(3)]
    messages.append(wire.decode(b"plain text", cache))
    spill.save(path, messages)
    loaded, invalid = spill.load(path)
    assert invalid == 0
    assert [m[wire.RAW] for m in loaded] == [m[wire.RAW] for m in messages]
    assert [m[wire.TASK] for m in loaded] == [0, 1, 2, 0, 1, 2, -1]
    assert spill.remove(path) is True and spill.remove(path) is False


@pytest.mark.parametrize("data, problem", [
    (b"junk that is not a spill file", "not a spill file"),
    (spill.SPILL_MAGIC + (10).to_bytes(4, "big") + b"short", "truncated"),
    (spill.SPILL_MAGIC + b"\x00\x00", "truncated"),
])
def test_spill_file_that_cannot_be_read_raises(tmp_path, data, problem):
    """A file that is not a spill file, or is cut short, raises SpillError and is kept."""
    path = tmp_path / "spill.bin"
    path.write_bytes(data)
    with pytest.raises(spill.SpillError, match=problem):
        spill.load(str(path))
    assert path.read_bytes() == data


def test_spill_frame_that_does_not_decode_is_counted(tmp_path):
    """A saved frame that no longer decodes is counted, not returned."""
    path = str(tmp_path / "spill.bin")
    good = wire.decode(run_frames(1, 1)[1].data(0), {})
    spill.save(path, [good, (b"\xff\x01bad",)])
    loaded, invalid = spill.load(path)
    assert [m[wire.RAW] for m in loaded] == [good[wire.RAW]] and invalid == 1


def test_ledger_counts_duplicates_ends_and_reports_a_complete_run(log):
    """Out of order, duplicates and END frames: each task counted once, one [RUN] line."""
    encoders, cache = run_frames(2, 3), {}
    frames = [encoders[1].data(2), encoders[1].data(0), encoders[2].data(0),
              encoders[1].data(0), encoders[1].data(1), encoders[2].data(1),
              encoders[2].data(2), encoders[1].end(3), encoders[2].end(3)]
    counters = Counters()
    ledger = runs.RunLedger(counters, log, logs.RateLimitedLog(log, 60))
    batch = [wire.decode(frame, cache) for frame in frames]
    assert ledger.process(batch, time.time_ns(), None, confirm.ConfirmPublisher(None, 1)) == 9
    (run,) = ledger.runs.values()
    assert (counters.processed, counters.duplicates, run.received, run.duplicates) == (6, 1, 6, 1)
    assert run.closed and run.missing_tasks(10) == ([], 0)
    assert run.latency.count == 6
    reports = [line for line in log.lines.messages if line.startswith("[RUN]")]
    assert len(reports) == 1 and "received 6/6 | missing 0" in reports[0]
    entry = ledger.to_json()[0]
    assert entry["complete"] and entry["sent_reported"] == 6 and entry["duplicates"] == 1


def test_ledger_records_a_task_only_after_its_work(log):
    """work() returning False (a cold stop) leaves that task and the rest unrecorded."""
    encoders, cache = run_frames(1, 5), {}
    batch = [wire.decode(encoders[1].data(task), cache) for task in range(5)]
    worked = []

    def work(msg):
        if len(worked) == 2:
            return False
        worked.append(msg[wire.TASK])
        return True

    counters = Counters()
    ledger = runs.RunLedger(counters, log, logs.RateLimitedLog(log, 60))
    assert ledger.process(batch, time.time_ns(), work, confirm.ConfirmPublisher(None, 1)) == 2
    (run,) = ledger.runs.values()
    assert worked == [0, 1] and run.received == counters.processed == 2
    assert run.missing_tasks(10) == ([(1, 2), (1, 3), (1, 4)], 3) and not run.closed
    # The rest, processed later (after a restart: from the spill file), completes the run.
    assert ledger.process(batch[2:], None, lambda msg: True,
                          confirm.ConfirmPublisher(None, 1)) == 3
    assert run.received == 5 and run.closed


def test_confirmations_published_as_ranges_per_run():
    """Processed tasks go out as one sealed CONFIRM message per run, each task once."""
    ctx = zmq.Context()
    with ctx.socket(zmq.PULL) as pull, ctx.socket(zmq.PUSH) as push:
        pull.bind("inproc://confirmations")
        push.connect("inproc://confirmations")
        publisher = confirm.ConfirmPublisher(push, 60)
        for worker, task in [(2, 5), (1, 3), (1, 4), (1, 4), (1, 6), (2, 6), (1, 5), (2, 9)]:
            publisher.add(7, worker, task)
        publisher.add(8, 1, 0)
        publisher.publish()
        publisher.publish_if_due()  # nothing pending, and not due: sends nothing
        got = {}
        for _ in range(2):
            assert pull.poll(5000)
            frames = pull.recv_multipart()
            run_id = 7 if frames[0] == confirm.RunSeal(7).topic else 8
            kind, body = confirm.RunSeal(run_id).open(frames)
            assert kind is confirm.Kind.CONFIRM
            got[run_id] = confirm.decode_confirmations(body)
        assert not pull.poll(50)
    ctx.term()
    assert got == {7: [(1, 3, 4), (2, 5, 2), (2, 9, 1)], 8: [(1, 0, 1)]}


def test_batch_put_back_in_front_keeps_the_order():
    """A batch put back after a cold stop comes out first; take_all() keeps the order."""
    batches = flow.BatchQueue(10)
    batches.put(flow.Batch(1, ["c", "d"]))
    taken = flow.Batch(0, ["a", "b"], recovered=True)
    batches.put_front(taken.rest(1))
    assert batches.qsize() == 3
    first = batches.get()
    assert first.items == ["b"] and first.recovered and first.recv_ns == 0
    batches.put_front(first)
    assert batches.take_all() == ["b", "c", "d"] and batches.qsize() == 0
