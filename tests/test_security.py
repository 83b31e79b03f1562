"""CURVE keys, authorized and refused clients, the IP allow list, the bind-all warning.

Every test runs the real scripts on 127.0.0.1; refused senders must fail fast and
loudly, and nothing they try to send may reach the receiver.
"""

import logging
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import zmq.auth

from conftest import RECEIVER, SENDER
from pushpull import gatekeeper, security

KEY_FILES = {"server.key", "server.key_secret", "client.key", "client.key_secret"}
QUIET_RECEIVER = ("--processing-time", "0", "--quiet", "--no-file-log", "--run-timeout", "1")
# A refused sender gives up as soon as its heartbeat sees the refusal (under a second,
# even on a busy machine), long before a receiver that is only down would be given up
# on: timeout 5 s x (1 + 1 retry) = 10 s. Every task counted `rejected`, and no [RETRY]
# line, say the refusal came first (not a wall-clock bound, which a busy machine breaks).
TIMEOUT = 5.0
RETRIES = 1


def fast_fail(timeout):
    """The sender's flags for a quick verdict: `timeout` s a wait, RETRIES, 1 s heartbeat."""
    return ("--timeout", f"{timeout:g}", "--retries", str(RETRIES), "--heartbeat-interval", "1")


def give_up_window(timeout):
    """Seconds before a sender of fast_fail(timeout) gives an absent receiver up."""
    return timeout * (1 + RETRIES)


FAST_FAIL = fast_fail(TIMEOUT)
GIVE_UP_WINDOW = give_up_window(TIMEOUT)
# A sender without a key learns that the receiver wants CURVE from the receiver's
# greeting alone, and libzmq's receiver may close the connection before its greeting is
# out (a race: the sender sees a dropped connection, HANDSHAKE_FAILED_NO_DETAIL, EPIPE).
# On a loaded machine such drops went on for 5-7 s of reconnections before a handshake
# named the mismatch (2 in 24 runs), so that test waits NO_KEY_TIMEOUT before a retry.
NO_KEY_TIMEOUT = 30.0


def generate(directory):
    """Run --generate-keys into `directory` (receiver script) and return the directory."""
    done = subprocess.run([sys.executable, str(RECEIVER), "--generate-keys", str(directory)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return directory


@pytest.fixture
def keys(tmp_path):
    """Two independent key sets, `good` and `other`, plus an allow dir with good's client."""
    good = generate(tmp_path / "good")
    other = generate(tmp_path / "other")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(good / "client.key", allow / "client.key")
    return {"good": good, "other": other, "allow": allow}


def curve_receiver(procs, keys):
    """A CURVE receiver that only lets in `good`'s client key."""
    return procs.receiver(*QUIET_RECEIVER,
                          "--curve-server-key", str(keys["good"] / "server.key_secret"),
                          "--curve-allow", str(keys["allow"]))


def timed_exit(proc, window=GIVE_UP_WINDOW):
    """Wait for `proc` to exit; returns (exit status, seconds since it was started)."""
    status = proc.wait(timeout=window + 10)
    return status, time.monotonic() - proc.started


def assert_refused_in_time(sender, planned, window=GIVE_UP_WINDOW):
    """The sender exits non-zero, every task `rejected`, before any retry; returns its JSON."""
    status, _ = timed_exit(sender, window)
    assert status != 0
    result = sender.summary()
    assert result["sent"] == 0
    # Had the refusal come after the give-up window, the tasks would be receiver_down.
    assert result["failed_by_reason"]["rejected"] == result["planned"] == planned, result
    assert not sender.lines(r"\[RETRY\]"), sender.output()[-2000:]
    # No bound on the time it took by TIMEOUT, the limit under test: the counts above say
    # the refusal came first (timed_exit's wait only tells it from a hang).
    return result


def start_sender(procs, receiver, *args):
    """A quiet sender to `receiver`, remembering when it was started."""
    started = time.monotonic()
    sender = procs.sender("--quiet", *args, endpoints=[receiver.endpoint])
    sender.started = started
    return sender


def stopped_summary(receiver):
    """Warm-stop the receiver and return its JSON summary."""
    assert receiver.stop() == 0, receiver.output()[-2000:]
    return receiver.summary()


@pytest.mark.parametrize("script", [RECEIVER, SENDER], ids=["receiver", "sender"])
def test_generate_keys_writes_four_certificates(tmp_path, script):
    """--generate-keys on either script writes the four pyzmq certificate files, exits 0."""
    target = tmp_path / "keys"
    done = subprocess.run([sys.executable, str(script), "--generate-keys", str(target)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in target.iterdir()} == KEY_FILES
    server_public, server_secret = zmq.auth.load_certificate(target / "server.key_secret")
    client_public, client_secret = zmq.auth.load_certificate(target / "client.key_secret")
    assert server_secret and client_secret and server_public != client_public
    assert zmq.auth.load_certificate(target / "server.key") == (server_public, None)
    assert zmq.auth.load_certificate(target / "client.key") == (client_public, None)


def test_receiver_generates_keys_whatever_its_key_flags_say(tmp_path):
    """A bad --curve-server-key / --curve-allow path does not block --generate-keys: the
    keys are loaded only for a run, after --generate-keys is handled."""
    target, missing = tmp_path / "keys", tmp_path / "no-such"
    done = subprocess.run([sys.executable, str(RECEIVER), "--generate-keys", str(target),
                           "--curve-server-key", str(missing / "server.key_secret"),
                           "--curve-allow", str(missing)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in target.iterdir()} == KEY_FILES


def test_sender_generates_keys_whatever_its_key_flags_say(tmp_path):
    """A bad --curve-client-key / --curve-server-public path does not block --generate-keys;
    without it, the same flags still exit 1 with the path named (issue 21)."""
    target, missing = tmp_path / "keys", tmp_path / "no-such"
    key_flags = ["--curve-client-key", str(missing / "client.key_secret"),
                 "--curve-server-public", str(missing / "server.key")]
    done = subprocess.run([sys.executable, str(SENDER), "--generate-keys", str(target),
                           *key_flags], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in target.iterdir()} == KEY_FILES
    done = subprocess.run([sys.executable, str(SENDER), "--messages", "1", *key_flags],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "client.key_secret" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no POSIX file modes")
def test_generate_keys_writes_secret_files_for_the_owner_only(tmp_path):
    """Secret key files get mode 0600, even over an old world-readable file."""
    target = tmp_path / "keys"
    target.mkdir()
    old = target / "client.key_secret"
    old.write_text("old")
    old.chmod(0o644)
    done = subprocess.run([sys.executable, str(RECEIVER), "--generate-keys", str(target)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600, name
    assert zmq.auth.load_certificate(old)[1], "the old file was overwritten with a key"


def test_curve_authorized_client_gets_everything_through(procs, keys):
    """A client whose public key is in --curve-allow delivers every message; none refused."""
    receiver = curve_receiver(procs, keys)
    sender = start_sender(procs, receiver, "--workers", "3", "--messages", "20",
                          "--delay", "0",
                          "--curve-client-key", str(keys["good"] / "client.key_secret"),
                          "--curve-server-public", str(keys["good"] / "server.key"))
    assert sender.wait() == 0, sender.output()[-2000:]
    assert sender.summary()["sent"] == 60
    receiver.wait_for_output(r"\[RUN\].*received 60/60")
    summary = stopped_summary(receiver)
    assert summary["received"] == 60
    assert summary["rejected"] == 0
    assert not receiver.lines(r"\[AUTH\]")


def test_unknown_client_key_is_refused_fast(procs, keys):
    """A client key not in --curve-allow: sender gives up at once, nothing arrives, one [AUTH]."""
    receiver = curve_receiver(procs, keys)
    sender = start_sender(procs, receiver, "--workers", "3", "--messages", "10",
                          "--delay", "0", *FAST_FAIL,
                          "--curve-client-key", str(keys["other"] / "client.key_secret"),
                          "--curve-server-public", str(keys["good"] / "server.key"))
    assert_refused_in_time(sender, 30)
    assert sender.lines(r"\[HEARTBEAT\].*rejected")
    # One line per cause, not one per worker; the count of those left out at the end.
    assert len(sender.lines(r"\[WAIT\] Pusher-\d+ paused")) <= 1, sender.output()
    assert len(sender.lines(r"\[FAIL\] Pusher-\d+ gives up: every receiver refused")) == 1
    assert sender.lines(r"\[FAIL\] 3 workers gave up: every receiver refused"), sender.output()
    summary = stopped_summary(receiver)
    assert summary["received"] == 0
    assert summary["rejected"] >= 1
    assert len(receiver.lines(r"\[AUTH\] refused peer 127\.0\.0\.1")) == 1


def assert_refused(sender, receiver):
    """The sender exits non-zero in time with every task refused; nothing was received.

    Returns the receiver's summary for the caller's own checks.
    """
    assert_refused_in_time(sender, 20)
    summary = stopped_summary(receiver)
    assert summary["received"] == 0
    return summary


def test_client_without_key_is_refused_by_curve_receiver(procs, keys):
    """A sender with no CURVE key at all cannot talk to a CURVE receiver: the first refused
    handshake counts every task `rejected` (before any retry), one [HEARTBEAT] rejected
    line; the receiver counts the refused peer once, not each of its handshakes."""
    receiver = curve_receiver(procs, keys)
    sender = start_sender(procs, receiver, "--workers", "2", "--messages", "10",
                          "--delay", "0", *fast_fail(NO_KEY_TIMEOUT))
    assert_refused_in_time(sender, 20, give_up_window(NO_KEY_TIMEOUT))
    assert len(sender.lines(r"\[HEARTBEAT\].* rejected")) == 1, sender.output()[-2000:]
    summary = stopped_summary(receiver)
    assert summary["received"] == 0
    # Its probe and two workers, retrying: one burst of refused handshakes, one peer.
    # On a busy machine each of them may give up before its greeting reaches the
    # receiver, which then sees only peers that left mid-handshake (not counted, no
    # line): the count agrees with the receiver's [AUTH] line, never above one.
    refusals = receiver.lines(r"\[AUTH\] refused a peer whose CURVE handshake failed")
    assert summary["rejected"] == min(1, len(refusals)), (summary, refusals)


def test_wrong_server_public_key_fails_within_timeout(procs, keys):
    """An allowed client given the wrong server key says so and exits non-zero in time."""
    receiver = curve_receiver(procs, keys)
    sender = start_sender(procs, receiver, "--workers", "2", "--messages", "10",
                          "--delay", "0", *FAST_FAIL,
                          "--curve-client-key", str(keys["good"] / "client.key_secret"),
                          "--curve-server-public", str(keys["other"] / "server.key"))
    assert_refused(sender, receiver)
    assert sender.lines(r"\[HEARTBEAT\].*(rejected|handshake failed)")


@pytest.mark.parametrize("bind", ["127.0.0.1", "::"], ids=["ipv4", "dual-stack"])
def test_ip_allow_list_admits_listed_address(procs, bind):
    """--allow-ip 127.0.0.1 lets a sender from 127.0.0.1 deliver everything, also to a
    receiver bound to :: (IPv6 and IPv4), which sees it as ::ffff:127.0.0.1."""
    if bind == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    receiver = procs.receiver(*QUIET_RECEIVER, "--allow-ip", "127.0.0.1", "--bind", bind)
    sender = start_sender(procs, receiver, "--workers", "2", "--messages", "10", "--delay", "0")
    assert sender.wait() == 0, sender.output()[-2000:]
    receiver.wait_for_output(r"\[RUN\].*received 20/20")
    summary = stopped_summary(receiver)
    assert summary["received"] == 20
    assert summary["rejected"] == 0


def test_ip_allow_list_refuses_other_address(procs):
    """--allow-ip 127.0.0.2 refuses a sender from 127.0.0.1: [AUTH] names it, nothing arrives."""
    receiver = procs.receiver(*QUIET_RECEIVER, "--allow-ip", "127.0.0.2")
    sender = start_sender(procs, receiver, "--workers", "2", "--messages", "10",
                          "--delay", "0", *FAST_FAIL)
    summary = assert_refused(sender, receiver)
    assert summary["rejected"] >= 1
    assert receiver.lines(r"\[AUTH\].*127\.0\.0\.1")


def test_bind_all_without_curve_warns(procs):
    """Bound to every interface without CURVE, the receiver warns at startup."""
    receiver = procs.receiver("--no-file-log", "--bind", "*")
    assert receiver.lines(r"\[AUTH\] bound to every interface without CURVE")
    assert receiver.stop() == 0


def test_bind_loopback_does_not_warn(procs):
    """Bound to 127.0.0.1 only, there is no bind-all warning."""
    receiver = procs.receiver("--no-file-log", "--bind", "127.0.0.1")
    assert receiver.stop() == 0
    assert receiver.lines(r"Server is running")
    assert not receiver.lines(r"\[AUTH\]")


# ---------------------------------------------------------------------------
# The gatekeeper's start (pushpull.gatekeeper.Gatekeeper), in-process
# ---------------------------------------------------------------------------
TERM_LIMIT = 10.0  # seconds: ctx.term() with every socket closed returns at once; else never


def terminates(ctx):
    """True when ctx.term() returns within TERM_LIMIT (it waits for ever while any socket
    of the context is open)."""
    term = threading.Thread(target=ctx.term, name="term", daemon=True)
    term.start()
    term.join(TERM_LIMIT)
    return not term.is_alive()


def test_gatekeeper_thread_is_named_and_stop_closes_its_sockets():
    ctx = zmq.Context()
    keeper = gatekeeper.start_gatekeeper(ctx, logging.getLogger("test"), ("127.0.0.1",),
                                         False, None, 1.0)
    assert keeper.thread.name == "gatekeeper"  # a thread dump names it
    keeper.stop()
    assert terminates(ctx)


def test_gatekeeper_thread_ending_before_ready_fails_at_once_leaving_no_socket(monkeypatch):
    # pyzmq's own start() waited 10 s, then raised with its ZAP socket open: the
    # receiver's ctx.term() then hung for ever, silent before its first line.
    monkeypatch.setattr(gatekeeper.AuthenticationThread, "run", lambda thread: None)
    ctx = zmq.Context()
    with pytest.raises(gatekeeper.GatekeeperError):
        gatekeeper.start_gatekeeper(ctx, logging.getLogger("test"), (), False, None, 1.0)
    assert terminates(ctx)
