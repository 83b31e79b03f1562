"""The receiver's package pieces on their own: spill file, run ledger, confirmations, queue."""

import logging
import os
import random
import time
import types

import pytest
import zmq

import conftest  # noqa: F401  (puts the project root on sys.path)
from pushpull import channel, logs, receiveflow, runs, spill, wire

RECEIVER = conftest.load_script("async-socket-receiver")


class Lines(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class Counters:
    """The totals a RunLedger and its RunTable write."""

    processed = duplicates = plain = clock_skew = 0


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


def ledger_for(log):
    """A RunLedger and its RunTable writing to fresh counters; returns (ledger, counters)."""
    counters, warnings = Counters(), logs.RateLimitedLog(log, 60)
    return runs.RunLedger(counters, runs.RunTable(counters, log, warnings), warnings), counters


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


def saved_bytes(tmp_path, count=3):
    """The bytes of a spill file holding `count` tasks of one run."""
    path = tmp_path / "saved.bin"
    cache = {}
    spill.save(str(path), [wire.decode(run_frames(1, count)[1].data(t), cache)
                           for t in range(count)])
    return path.read_bytes()


def damaged(kind, data):
    """A spill file's bytes, damaged in one way."""
    record_end = len(spill.SPILL_MAGIC) + spill.RECORD.size
    frame_size = spill.RECORD.unpack_from(data, len(spill.SPILL_MAGIC))[0]
    first_frame_end = record_end + frame_size
    return {
        "junk": b"junk that is not a spill file",
        "cut inside a frame": data[:first_frame_end - 3],
        "cut at a frame boundary": data[:first_frame_end],
        "no trailer": data[:-spill.TRAILER.size - len(spill.END_MARK)],
        "flipped byte": data[:record_end + 5] + bytes([data[record_end + 5] ^ 1])
                        + data[record_end + 6:],
        "bytes after the trailer": data + b"\x00",
        "format 1": spill.SPILL_MAGIC_1 + (5).to_bytes(4, "big") + b"frame",
    }[kind]


@pytest.mark.parametrize("kind, problem", [
    ("junk", "not a spill file"),
    ("cut inside a frame", "truncated"),
    ("cut at a frame boundary", "truncated after 1 frames"),
    ("no trailer", "truncated after 3 frames"),
    ("flipped byte", "corrupt: frame 1 fails its CRC"),
    ("bytes after the trailer", "corrupt"),
    ("format 1", "older receiver"),
])
def test_spill_file_that_cannot_be_read_raises(tmp_path, kind, problem):
    """A file that is not a spill file, cut short (at a frame boundary too) or changed
    raises SpillError and is kept."""
    path = tmp_path / "spill.bin"
    data = damaged(kind, saved_bytes(tmp_path))
    path.write_bytes(data)
    with pytest.raises(spill.SpillError, match=problem):
        spill.load(str(path))
    assert path.read_bytes() == data


def test_zero_length_spill_file_is_empty(tmp_path):
    """A spill file of no bytes (created, never written) holds nothing: no error."""
    path = tmp_path / "spill.bin"
    path.write_bytes(b"")
    assert spill.load(str(path)) == ([], 0)


def test_spill_frame_that_does_not_decode_is_counted(tmp_path):
    """A saved frame that no longer decodes is counted, not returned."""
    path = str(tmp_path / "spill.bin")
    good = wire.decode(run_frames(1, 1)[1].data(0), {})
    spill.save(path, [good, (b"\xff\x01bad",) + good[1:]])
    loaded, invalid = spill.load(path)
    assert [m[wire.RAW] for m in loaded] == [good[wire.RAW]] and invalid == 1


def test_spill_writer_counts_what_it_holds_and_a_failed_write_loses_it_all(tmp_path):
    """Counts per run while it writes; a write that fails removes PATH.tmp and counts
    everything it held, and all it is given after, as lost."""
    encoders, cache = run_frames(2, 3), {}
    messages = [wire.decode(encoders[w].data(t), cache) for w in (1, 2) for t in range(3)]
    path = tmp_path / "spill.bin"
    writer = spill.SpillWriter(str(path))
    writer.write(messages[:4])
    assert (writer.data, sum(writer.runs.values())) == (4, 4)
    assert sorted(info.run_id for info in writer.runs) == [messages[0][wire.RUN].run_id]
    writer.commit()
    assert spill.load(str(path))[0][3][wire.RAW] == messages[3][wire.RAW]

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to make a write fail as on a full disk")
    full = spill.SpillWriter(str(path))
    os.symlink("/dev/full", full.temporary)  # every write fails: no space left
    with pytest.raises(OSError):
        full.write(messages[:4])
        full.commit()  # the write may only fail here, when the buffer is flushed
    with pytest.raises(OSError):
        full.write(messages[4:])
    assert (full.data, full.lost, full.runs) == (0, 6, {}), vars(full)
    assert "space" in full.error
    assert not os.path.lexists(full.temporary)
    assert len(spill.load(str(path))[0]) == 4  # the spill file before it is untouched
def work_each(ledger, batch, received_ns, work):
    """The receiver script's per-message loop (ProcessorThread.work_each), run on `ledger`
    with `work` as the work of one message."""
    processor = types.SimpleNamespace(ledger=ledger, work=work)
    return RECEIVER.ProcessorThread.work_each(processor, batch, received_ns,
                                              channel.ConfirmPublisher(None, 1))


@pytest.mark.parametrize("path", ["record_batch", "work_each"])
def test_ledger_counts_duplicates_ends_and_reports_a_complete_run(log, path):
    """Out of order, duplicates and END frames: each task counted once, one [RUN] line;
    the same whether the batch takes the fast path or the per-message one."""
    encoders, cache = run_frames(2, 3), {}
    frames = [encoders[1].data(2), encoders[1].data(0), encoders[2].data(0),
              encoders[1].data(0), encoders[1].data(1), encoders[2].data(1),
              encoders[2].data(2), encoders[1].end(3), encoders[2].end(3)]
    ledger, counters = ledger_for(log)
    batch = [wire.decode(frame, cache) for frame in frames]
    if path == "record_batch":
        taken = ledger.record_batch(batch, time.time_ns(), channel.ConfirmPublisher(None, 1))
    else:
        worked = []
        taken = work_each(ledger, batch, time.time_ns(), lambda msg: worked.append(msg) or True)
        assert len(worked) == 6  # neither the duplicate nor the END frames were worked
    assert taken == 9
    (run,) = ledger.table.runs.values()
    assert (counters.processed, counters.duplicates, run.tasks.received, run.duplicates) == \
        (6, 1, 6, 1)
    assert run.closed and run.tasks.missing_ranges(10) == [] and run.tasks.missing == 0
    assert run.latency.count == 6
    reports = [line for line in log.lines.messages if line.startswith("[RUN]")]
    assert len(reports) == 1 and "received 6/6 | missing 0" in reports[0]
    entry = ledger.table.to_json()[0]
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

    ledger, counters = ledger_for(log)
    assert work_each(ledger, batch, time.time_ns(), work) == 2
    (run,) = ledger.table.runs.values()
    assert worked == [0, 1] and run.tasks.received == counters.processed == 2
    assert run.tasks.missing_ranges(10) == [(1, 1, 2, 4)] and run.tasks.missing == 3
    assert not run.closed
    # The rest, processed later (after a restart: from the spill file), completes the run.
    assert work_each(ledger, batch[2:], None, lambda msg: True) == 3
    assert run.tasks.received == 5 and run.closed


def test_confirmations_published_as_ranges_per_run():
    """Processed tasks go out as one sealed CONFIRM message per run, each task once."""
    ctx = zmq.Context()
    with ctx.socket(zmq.PULL) as pull, ctx.socket(zmq.PUSH) as push:
        pull.bind("inproc://confirmations")
        push.connect("inproc://confirmations")
        publisher = channel.ConfirmPublisher(push, 60)
        for worker, task in [(2, 5), (1, 3), (1, 4), (1, 4), (1, 6), (2, 6), (1, 5), (2, 9)]:
            publisher.add(7, worker, task)
        publisher.add(8, 1, 0)
        publisher.publish()
        publisher.publish_if_due()  # nothing pending, and not due: sends nothing
        got = {}
        for _ in range(2):
            assert pull.poll(5000)
            frames = pull.recv_multipart()
            run_id = 7 if frames[0] == channel.RunSeal(7).topic else 8
            kind, body = channel.RunSeal(run_id).open(frames)
            assert kind is channel.Kind.CONFIRM
            got[run_id] = channel.decode_confirmations(body)
        assert not pull.poll(50)
    ctx.term()
    assert got == {7: [(1, 3, 4), (2, 5, 2), (2, 9, 1)], 8: [(1, 0, 1)]}


def test_batch_put_back_in_front_keeps_the_order():
    """A batch put back after a cold stop comes out first; take_all() keeps the order."""
    batches = receiveflow.BatchQueue(10, 1000)
    batches.put(receiveflow.Batch(1, ["c", "d"]))
    taken = receiveflow.Batch(0, ["a", "b"], recovered=True)
    batches.put_front(taken.rest(1))
    assert batches.qsize() == 3
    first = batches.get()
    assert first.items == ["b"] and first.recovered and first.recv_ns == 0
    batches.put_front(first)
    assert batches.take_all() == ["b", "c", "d"] and batches.qsize() == 0


def feed(ledger, frames, cache):
    """Decode frames and let the ledger take them as one batch, without work."""
    batch = [wire.decode(frame, cache) for frame in frames]
    return ledger.record_batch(batch, time.time_ns(), channel.ConfirmPublisher(None, 1))


def test_missing_tasks_are_ranges_over_workers_and_tasks(log):
    """Gaps inside a worker, its tail, and workers never heard from, as ranges, in order."""
    encoders, cache = run_frames(5, 10), {}
    ledger, _ = ledger_for(log)
    feed(ledger, [encoders[2].data(t) for t in (0, 1, 4, 7)] + [encoders[4].data(9)], cache)
    (run,) = ledger.table.runs.values()
    assert run.tasks.missing == 45
    assert [runs.range_text(r) for r in run.tasks.missing_ranges(10)] == [
        "Pusher-1:0-9", "Pusher-2:2-3", "Pusher-2:5-6", "Pusher-2:8-9", "Pusher-3:0-9",
        "Pusher-4:0-8", "Pusher-5:0-9"]
    assert len(run.tasks.missing_ranges(3)) == 3


def test_open_runs_are_capped_the_oldest_closed_early(log, monkeypatch):
    """Past OPEN_RUNS_MAX the oldest open run is closed early and freed; past RUNS_LISTED
    the oldest freed run is left out. A freed incomplete run's later tasks are untracked."""
    monkeypatch.setattr(runs, "OPEN_RUNS_MAX", 3)
    monkeypatch.setattr(runs, "RUNS_LISTED", 4)
    monkeypatch.setattr(runs, "RUN_EVICT_IDLE", 0)
    ledger, counters = ledger_for(log)
    table, cache, encoders = ledger.table, {}, [run_frames(1, 2) for _ in range(6)]
    for enc in encoders:
        feed(ledger, [enc[1].data(0)], cache)
        assert len(table.open) + len(table.unhealed) <= 3 and len(table.runs) <= 4
    assert len(table.open) == 3 and table.left_out == 2
    assert any("closed early: over 3 runs open" in line for line in log.lines.messages)
    third = encoders[2][1].run.run_id
    assert not table.runs[third].tasks.tracked
    feed(ledger, [encoders[2][1].data(1)], cache)  # its last task, after it was freed
    entry = table.runs[third].to_json()
    assert entry["untracked"] == 1 and not entry["complete"] and entry["missing"] == 1
    assert entry["missing_tasks"] == ["Pusher-1:1"]  # as it was when freed
    assert counters.processed == 7


def test_a_run_reported_incomplete_is_freed_before_an_open_one(log, monkeypatch):
    """The cap frees the oldest run already reported incomplete before closing an open run."""
    monkeypatch.setattr(runs, "OPEN_RUNS_MAX", 2)
    monkeypatch.setattr(runs, "RUN_EVICT_IDLE", 0)
    ledger, _ = ledger_for(log)
    cache, first, second, third = {}, run_frames(1, 2), run_frames(1, 2), run_frames(1, 2)
    feed(ledger, [first[1].data(0)], cache)
    ledger.table.report_silent(0)  # first: reported incomplete, task state kept
    feed(ledger, [second[1].data(0)], cache)
    feed(ledger, [third[1].data(0)], cache)
    assert list(ledger.table.open) == [second[1].run.run_id, third[1].run.run_id]
    assert not ledger.table.unhealed
    assert not ledger.table.runs[first[1].run.run_id].tasks.tracked
    assert not any("closed early" in line for line in log.lines.messages)


def test_shown_escapes_control_characters_and_cuts_long_text():
    """Printable text is returned as it is; control characters escaped; long text cut."""
    assert logs.shown("Pusher-1 é ok") == "Pusher-1 é ok"
    assert logs.shown("a\nb\x1b[2J\t\u2028") == "a\\nb\\x1b[2J\\t\\u2028"
    long = logs.shown("x" * (logs.TEXT_SHOWN + 5))
    assert long == "x" * logs.TEXT_SHOWN + " ... (+5 characters)"


def test_a_receiving_run_keeps_its_state_new_runs_past_the_bound_are_untracked(log,
                                                                              monkeypatch):
    """Issue 19, case 1: with every run kept heard from within RUN_EVICT_IDLE, a new run
    is refused (its messages processed, counted untracked, its END ignored) and never
    tracked later from zero; once a run is idle, it makes room."""
    monkeypatch.setattr(runs, "OPEN_RUNS_MAX", 2)
    ledger, counters = ledger_for(log)
    table, cache = ledger.table, wire.new_run_cache()
    live, other, refused = run_frames(1, 3), run_frames(1, 2), run_frames(1, 2)
    feed(ledger, [live[1].data(0), other[1].data(0)], cache)
    feed(ledger, [refused[1].data(0), refused[1].end(1)], cache)
    assert (table.refused, table.untracked) == (1, 1)
    feed(ledger, [live[1].data(1)], cache)
    monkeypatch.setattr(runs, "RUN_EVICT_IDLE", 0)  # every run idle now: room is made ...
    feed(ledger, [refused[1].data(1)], cache)  # ... but a refused run stays untracked
    assert (table.refused, table.untracked) == (1, 2)
    assert refused[1].run.run_id not in table.runs
    feed(ledger, [live[1].data(2)], cache)
    assert table.runs[live[1].run.run_id].tasks.complete
    assert counters.processed == 6 and counters.plain == 0


def test_eviction_order_follows_the_last_message(log, monkeypatch):
    """The run heard from least recently makes room first, not the run first seen."""
    monkeypatch.setattr(runs, "OPEN_RUNS_MAX", 2)
    monkeypatch.setattr(runs, "RUN_EVICT_IDLE", 0)
    ledger, _ = ledger_for(log)
    cache, first, second, third = wire.new_run_cache(), *(run_frames(1, 3) for _ in range(3))
    feed(ledger, [first[1].data(0)], cache)
    feed(ledger, [second[1].data(0)], cache)
    feed(ledger, [first[1].data(1)], cache)  # first is the most recent now
    feed(ledger, [third[1].data(0)], cache)
    assert list(ledger.table.open) == [first[1].run.run_id, third[1].run.run_id]


def test_a_new_runs_cost_does_not_grow_with_the_runs_seen():
    """Issue 19, case 4: the receiver's run cache (spill.known_runs) forgets its oldest
    run in constant time: new runs after 170,000 cost about what they do just after it
    filled (with a dict's next(iter()): 8 times more).

    A ratio, not a speed: small batches timed in turn on the two caches, the fastest of
    each kept, so a machine busy enough to slow one batch slows its pair too.
    """
    def new_runs(cache, count):
        frames = [one_task_run(random.getrandbits(63)) for _ in range(count)]
        started = time.perf_counter()
        for data in frames:
            wire.decode(data, cache)
        return time.perf_counter() - started

    filled, aged = spill.known_runs([]), spill.known_runs([])
    new_runs(filled, wire.RUNS_REMEMBERED + 5000)
    new_runs(aged, wire.RUNS_REMEMBERED + 105_000)
    pairs = [(new_runs(filled, 500), new_runs(aged, 500)) for _ in range(15)]
    first, later = min(f for f, _ in pairs), min(a for _, a in pairs)
    assert len(filled) == len(aged) == 2 * wire.RUNS_REMEMBERED
    assert later < 3 * first, (first, later)


def one_task_run(run_id):
    """A one-task run's first frame."""
    now = time.time_ns()
    return wire.HEADER.pack(wire.WIRE_MAGIC, 0, 1, 1, 2, run_id, wire.DATA, 0, 1, 0, now, now,
                            1) + b"x"


def test_tasks_in_any_order_are_recorded_once_as_ranges(log):
    """Tasks in random order, with repeats: each recorded once, the missing ones exact,
    the ranges held ahead given back as gaps fill."""
    rng = random.Random(19)
    ledger, counters = ledger_for(log)
    encoders, cache = run_frames(3, 200), wire.new_run_cache()
    sent = [(w, t) for w in (1, 2, 3) for t in range(200) if rng.random() < 0.7]
    sent += rng.sample(sent, 50)  # repeats
    rng.shuffle(sent)
    feed(ledger, [encoders[w].data(t) for w, t in sent], cache)
    (run,) = ledger.table.runs.values()
    distinct = set(sent)
    assert run.tasks.received == len(distinct) and counters.duplicates == len(sent) - len(
        distinct)
    missing = {(w, t) for w in (1, 2, 3) for t in range(200)} - distinct
    listed = {(w, t) for r in run.tasks.missing_ranges(10_000)
              for w in range(r[0], r[1] + 1) for t in range(r[2], r[3] + 1)}
    assert listed == missing
    feed(ledger, [encoders[w].data(t) for w, t in sorted(missing)], cache)
    assert run.tasks.complete and ledger.table.ahead_budget.used == 0


@pytest.mark.parametrize("path", ["record_batch", "work_each"])
def test_a_runs_rate_spans_its_messages_not_a_later_end_frame(log, path):
    """The END frames of a run come in a later batch, after its [RUN] line: its rate, in
    that line and in the JSON, spans its messages alone, so both say the same."""
    encoders, cache = run_frames(1, 2), {}
    data = [wire.decode(encoders[1].data(task), cache) for task in range(2)]
    end = [wire.decode(encoders[1].end(2), cache)]
    ledger, _ = ledger_for(log)
    publisher = channel.ConfirmPublisher(None, 1)
    first_ns = time.time_ns()
    for batch, received_ns in ((data[:1], first_ns), (data[1:], first_ns + 10**9),
                               (end, first_ns + 5 * 10**9)):
        if path == "record_batch":
            ledger.record_batch(batch, received_ns, publisher)
        else:
            work_each(ledger, batch, received_ns, lambda msg: True)
    (run,) = ledger.table.runs.values()
    assert run.rates()[0] == 2.0  # 2 messages over the 1 s between their batches
    (line,) = [line for line in log.lines.messages if "rate " in line]
    assert "rate 2.0 msg/s" in line and ledger.table.to_json()[0]["rate_msg_s"] == 2.0
