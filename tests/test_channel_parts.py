"""Unit tests of the confirmation channel's parts: sealed messages, report validation,
merging several receivers' reports, and the gates."""

import json
import logging

import zmq

from conftest import load_script

load_script("async-socket-sender")  # puts the project root on sys.path
from pushpull import channel, listener, verdict, windows  # noqa: E402

RUN_ID = 0x1234_5678_9ABC_DEF0


def test_a_sealed_message_opens_only_with_its_run_id():
    """The topic is not the run id, and a message opens only under its own run's seal."""
    seal = channel.RunSeal(RUN_ID)
    frames = seal.seal(channel.Kind.CONFIRM, b"payload")
    assert len(seal.topic) == channel.TOPIC_SIZE
    assert seal.topic != channel.RUN_KEY.pack(RUN_ID)
    assert RUN_ID.to_bytes(8, "big") not in b"".join(frames)
    assert seal.open(frames) == (channel.Kind.CONFIRM, b"payload")
    assert channel.RunSeal(RUN_ID + 1).open(frames) is None


def test_forged_and_malformed_messages_are_refused():
    """A peer that knows only the topic cannot forge: any change to a frame is refused."""
    seal = channel.RunSeal(RUN_ID)
    topic, body, mac = seal.seal(channel.Kind.REPORT, b"x" * 8 + b"{}")
    forged_body = bytes([channel.Kind.CONFIRM]) + channel.CONFIRM_RANGE.pack(1, 0, 100)
    assert seal.open([topic, forged_body, mac]) is None
    assert seal.open([topic, body, bytes(channel.MAC_SIZE)]) is None
    assert seal.open([topic, body]) is None
    assert seal.open([topic, body, mac, b""]) is None
    assert seal.open([topic, b"", mac]) is None
    assert seal.open([topic, body, mac[:-1]]) is None
    unknown_kind = seal.seal(channel.Kind.REPORT, b"")
    unknown_kind[1] = b"\x7f"
    unknown_kind[2] = seal._mac(unknown_kind[0] + unknown_kind[1])[:channel.MAC_SIZE]
    assert seal.open(unknown_kind) is None


def test_a_huge_confirmed_range_walks_the_window_not_the_range():
    """count = 2**32 - 1 from the network costs the window's size, not 4 billion steps."""
    window = windows.UnconfirmedWindow(10)
    for task in range(5):
        window.add(task, b"frame")
    assert window.confirm(2, 2**32 - 1) == 3
    assert [task for task, _ in window.unconfirmed()] == [0, 1]


def test_a_report_is_bounded_escaped_and_checked():
    """Counts must be counts; strings are escaped and cut; deep or huge values are dropped."""
    entry = {"planned": 10, "received": 9, "duplicates": 0, "run_id": "ab\n[RUN] forged\x1b",
             "latency_ms": {"p99": 0.5, "max": float("nan"), "p50": -1},
             "missing_tasks": [f"Pusher-1:{t}" for t in range(200)], "BAD KEY": 1,
             "deep": {"a": {"b": {"c": {"d": 1}}}}, "text": "x" * 1000}
    parsed = verdict.parse_report(json.dumps(entry).replace("NaN", "1e999").encode())
    assert parsed["received"] == 9
    assert "\n" not in parsed["run_id"] and "\x1b" not in parsed["run_id"]
    assert "\\n" in parsed["run_id"] and "\\x1b" in parsed["run_id"]
    assert len(parsed["missing_tasks"]) == verdict.REPORT_ITEMS
    assert len(parsed["text"]) <= verdict.REPORT_TEXT
    assert "BAD KEY" not in parsed and parsed["deep"]["a"]["b"]["c"] is None
    assert verdict.latency(parsed) == {"p99": 0.5}
    for bad in (b"\xff", b"[1]", b"{", json.dumps({**entry, "received": -1}).encode(),
                json.dumps({**entry, "received": "9"}).encode(),
                json.dumps({**entry, "planned": True}).encode(), b"[" * 100000):
        assert verdict.parse_report(bad) is None, bad[:40]


def test_reports_of_several_receivers_merge_into_one_verdict():
    """Counts add up; the merged p99 is the largest receiver's, an upper bound."""
    first = {"planned": 100, "received": 60, "duplicates": 1, "latency_ms": {"p99": 0.4}}
    second = {"planned": 100, "received": 38, "duplicates": 0, "latency_ms": {"p99": 0.9}}
    merged = verdict.merge([first, second], planned=100)
    assert merged["received"] == 98 and merged["missing"] == 2 and merged["duplicates"] == 1
    assert merged["latency_ms"]["p99"] == 0.9 and merged["receivers"] == 2
    assert verdict.report_line(merged).startswith("98/100 received, missing 2")


def test_gates_pass_fail_and_fail_without_a_report():
    """{name, limit, value, passed}: a value over its limit fails, and so does no value."""
    merged = verdict.merge([{"planned": 200, "received": 198, "duplicates": 0,
                             "latency_ms": {"p99": 2.5}}], planned=200)
    loss = verdict.Gate("max-loss", 1.0)
    p99 = verdict.Gate("max-p99", 2.0)
    assert loss.judge(merged, "") == {"name": "max-loss", "limit": 1.0, "value": 1.0,
                                      "passed": True}
    assert p99.judge(merged, "") == {"name": "max-p99", "limit": 2.0, "value": 2.5,
                                     "passed": False}
    none = loss.judge(None, "no report: not connected")
    assert none["passed"] is False and none["value"] is None
    assert "not connected" in verdict.gate_line(none, "%")


def test_a_report_too_large_is_cut_to_fit_keeping_what_the_sender_uses():
    """Long lists are halved until the JSON fits; without lists, the counts and latency stay."""
    entry = {"planned": 10, "received": 9, "duplicates": 0, "latency_ms": {"p99": 0.5},
             "missing_tasks": [f"Pusher-1:{t}" for t in range(100000)]}
    data = channel.report_json(entry)
    assert len(data) <= verdict.REPORT_MAX_BYTES
    parsed = verdict.parse_report(data)
    assert parsed["received"] == 9 and 0 < len(parsed["missing_tasks"]) < 100000
    huge = {**entry, "missing_tasks": [], "histogram": {str(k): k for k in range(10000)}}
    parsed = verdict.parse_report(channel.report_json(huge))
    assert parsed["latency_ms"] == {"p99": 0.5} and "histogram" not in parsed


def test_at_risk_is_what_the_reports_lack_once_every_receiver_reported():
    """Every receiver reported the run: at_risk is exact, sent - received; else it is the
    sender's own bound, never more than it sent."""
    assert verdict.risk(2000, 0, {"receivers": 2, "received": 1950}) == (50, True)
    assert verdict.risk(2000, 600, {"receivers": 2, "received": 2000}) == (0, True)
    # Issue 20, case 5: a receiver seen down after it was handed messages may have been
    # replaced by a new instance, which does not speak for the old one: not exact.
    assert verdict.risk(2000, 600, {"receivers": 2, "received": 1950}) == (50, False)
    assert verdict.risk(2000, 30, {"receivers": 2, "received": 1950}) == (30, False)
    one_of_two = {"receivers": 1, "received": 1000, "reason": "not every receiver reported"}
    assert verdict.reported_received(one_of_two) is None
    assert verdict.risk(2000, 600, one_of_two) == (600, False)
    assert verdict.risk(100, 600, {"receivers": 0, "reason": "not connected"}) == (100, False)


def test_a_repeated_report_counts_once_and_a_later_one_replaces_it():
    """Receivers repeat each report (channel.REPORT_REPEAT_S): a repeat of the report kept
    changes nothing (one receiver, the same counts, the same arrival time for --find-max's
    drain, no end to a silence); a later report of the same instance with other counts
    (the run healed) replaces it, and another instance's report replaces the instance."""
    log = logging.getLogger("test")
    chan = listener.ConfirmChannel(RUN_ID, ["tcp://127.0.0.1:5560"], None, None, 1.0, 1)
    source = chan.sources[0]
    seal = channel.RunSeal(RUN_ID)

    def report(instance, received):
        entry = {"planned": 100, "received": received, "duplicates": 0}
        return seal.seal(channel.Kind.REPORT, instance + channel.report_json(entry))

    first = report(b"A" * 8, 60)
    chan.on_message(source, first, log)
    assert source.reported_at > 0 and source.last_authentic > 0
    source.reported_at = source.last_authentic = 0.0  # marks: a repeat must leave them
    for _ in range(50):
        chan.on_message(source, list(first), log)
    assert source.authentic == 51 and source.dropped == 0
    assert source.reported_at == 0.0 and source.last_authentic == 0.0
    assert list(source.reports) == [b"A" * 8] and chan._received() == 60
    chan.on_message(source, report(b"A" * 8, 100), log)  # complete after all
    assert list(source.reports) == [b"A" * 8] and chan._received() == 100
    assert source.reported_at > 0 and source.last_authentic > 0
    chan.on_message(source, report(b"B" * 8, 40), log)  # a restart
    assert source.current() == (b"B" * 8, {"planned": 100, "received": 40, "duplicates": 0})
    assert [instance for instance, _ in source.replaced()] == [b"A" * 8]


def received_reports(sub, count):
    """(run id, received) of the next `count` REPORTs on `sub` (subscribed to everything),
    in order; fails if one more is waiting."""
    ids = []
    for _ in range(count):
        assert sub.poll(5000), ids  # inproc: sent is there at once; 5 s only bounds a failure
        frames = sub.recv_multipart()
        ids += [(run_id, json.loads(opened[1][channel.RECEIVER_ID_SIZE:])["received"])
                for run_id in RUN_IDS if (opened := channel.RunSeal(run_id).open(frames))]
    assert not sub.poll(0), "more reports than expected"
    return ids


RUN_IDS = [RUN_ID + n for n in range(channel.REPORTS_REPEATED + 4)]


def test_a_publisher_repeats_the_latest_reports_and_no_more():
    """Each report goes out at once; publish() repeats the latest REPORTS_REPEATED runs'
    (a run reported again moves to the latest, its newer report replacing the older)."""
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as pub, ctx.socket(zmq.SUB) as sub:
        pub.bind("inproc://reports")
        sub.connect("inproc://reports")
        sub.subscribe(b"")
        publisher = channel.ConfirmPublisher(pub, interval=0.05)
        for run_id in RUN_IDS:
            publisher.report(run_id, {"planned": 1, "received": 0, "duplicates": 0})
        assert received_reports(sub, len(RUN_IDS)) == [(run_id, 0) for run_id in RUN_IDS]
        publisher.report(RUN_IDS[0], {"planned": 1, "received": 1, "duplicates": 0})
        assert received_reports(sub, 1) == [(RUN_IDS[0], 1)]
        publisher.publish()
        latest = [(run_id, 0) for run_id in RUN_IDS[-channel.REPORTS_REPEATED + 1:]]
        assert received_reports(sub, channel.REPORTS_REPEATED) == latest + [(RUN_IDS[0], 1)]
