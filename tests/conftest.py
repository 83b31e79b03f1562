"""Shared fixtures: the real scripts run as processes on 127.0.0.1, on free ports."""

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pushpull.cli import FREE_PORTS, pair_is_free  # noqa: E402
RECEIVER = ROOT / "async-socket-receiver.py"
SENDER = ROOT / "async-socket-sender.py"
READY_LINE = "Server is running"


class WorkerPorts:
    """Port pairs for this pytest process alone: its share of cli.FREE_PORTS, each once.

    cli.free_port() picks at random and checks the pair is free, but two xdist workers
    could pick the same pair before either bound it (a receiver then exited "port in
    use", once in four loaded runs of the suite). Each worker takes every n-th pair.
    """

    def __init__(self):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        share = list(FREE_PORTS[int(worker.removeprefix("gw")) % workers::workers])
        random.shuffle(share)  # a second suite beside this one starts elsewhere
        self._pairs = iter(share)

    def free_port(self):
        """A free port whose successor is free too, never handed out before in this process."""
        for port in self._pairs:
            if pair_is_free(port):
                return port
        raise RuntimeError("this worker has used every port pair of its share")


free_port = WorkerPorts().free_port  # re-exported for the tests


def wait_until(predicate, timeout, what="condition"):
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def thread_dump(pid):
    """The Python stacks of every thread of process `pid` (py-spy, requirements-dev.txt), to
    tell where a process that timed out is stuck; a line saying why not, without py-spy."""
    if shutil.which("py-spy") is None:
        return "(no thread dump: py-spy is not installed)"
    try:
        done = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=DUMP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"(no thread dump: py-spy took over {DUMP_TIMEOUT:g} s)"
    return f"thread dump (py-spy):\n{done.stdout}{done.stderr}"


DUMP_TIMEOUT = 10.0  # seconds py-spy gets to dump a process's threads
OVERLOADED = 4  # load average per core past which a failed timing assertion is a skip


@contextlib.contextmanager
def timing_judged_on_load(what):
    """Assertions on timing the machine can break (`what` breaks them): a failure is a
    skip naming the load past OVERLOADED x the cores, a failure below it."""
    try:
        yield
    except AssertionError:
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0]
        if load > OVERLOADED * cores:
            pytest.skip(f"load average {load:.1f} on {cores} cores: {what}")
        raise


def load_script(name):
    """Import a hyphenated script (e.g. 'async-socket-receiver') as a module."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


class Proc:
    """A script running as a child process, its console captured to a file.

    `prefix` goes before the interpreter, e.g. ("ip", "netns", "exec", NS); it must
    exec the command, so that the child's pid and signals are the script's.
    """

    def __init__(self, script, args, cwd, name, prefix=()):
        self.out_path = Path(cwd) / f"{name}.out"
        self.json_path = Path(cwd) / f"{name}.json"
        self.args = list(args)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.out_path, "wb") as out:
            self.popen = subprocess.Popen(
                [*prefix, sys.executable, str(script), *self.args, "--json",
                 str(self.json_path)],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self):
        """The child's process id."""
        return self.popen.pid

    def output(self):
        """Everything the process printed so far."""
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, pattern):
        """Lines of output matching the regular expression `pattern`."""
        rx = re.compile(pattern)
        return [line for line in self.output().splitlines() if rx.search(line)]

    def wait_for_output(self, pattern, timeout=30, count=1):
        """Wait until `count` lines match `pattern`; returns them. Fails at once when the
        process exits first; on a timeout, the message has its threads' stacks."""
        def found():
            exited = self.popen.poll() is not None  # before reading: its last lines are in
            hits = self.lines(pattern)
            if len(hits) >= count:
                return hits
            if exited:
                raise AssertionError(f"process exited ({self.popen.returncode}) before"
                                     f" printing {pattern!r}:\n{self.output()[-3000:]}")
            return None
        try:
            return wait_until(found, timeout, f"{pattern!r}")
        except AssertionError as exc:
            if self.popen.poll() is not None:
                raise
            raise AssertionError(f"{exc}; output:\n{self.output()[-2000:]}\n"
                                 f"{thread_dump(self.pid)}") from None

    def signal(self, sig):
        """Send a signal (signal.SIGINT, SIGTERM, SIGKILL, SIGSTOP, SIGCONT)."""
        self.popen.send_signal(sig)

    def wait(self, timeout=30):
        """Wait for exit; returns the exit status."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process still running after {timeout} s:\n"
                                 f"{self.output()[-3000:]}") from None

    def summary(self):
        """The --json summary the process wrote at exit."""
        return json.loads(self.json_path.read_text(encoding="utf-8"))

    def stop(self, timeout=30):
        """Ctrl+C (warm stop), then wait; returns the exit status."""
        self.signal(signal.SIGINT)
        return self.wait(timeout)

    def cleanup(self):
        """Make sure the process is gone (test teardown)."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGCONT)
            except (OSError, AttributeError):
                pass
            self.popen.kill()
            self.popen.wait(10)


@pytest.fixture
def procs(tmp_path):
    """Factory for receivers and senders; every process is killed at teardown."""
    started = []

    class Factory:
        workdir = tmp_path

        def receiver(self, *args, port=None, wait_ready=True, name=None, cwd=None):
            """Start a receiver on `port` (a free one by default), quiet-free and fast."""
            port = port or free_port()
            name = name or f"receiver{len(started)}"
            proc = Proc(RECEIVER, ["--port", str(port), "--bind", "127.0.0.1", *args],
                        cwd or tmp_path, name)
            proc.port = port
            proc.endpoint = f"tcp://127.0.0.1:{port}"
            started.append(proc)
            if wait_ready:
                proc.wait_for_output(READY_LINE)
            return proc

        def sender(self, *args, endpoints=(), name=None, cwd=None):
            """Start a sender connected to `endpoints` (a list of tcp://... strings)."""
            name = name or f"sender{len(started)}"
            connect = [a for ep in endpoints for a in ("--connect", ep)]
            proc = Proc(SENDER, [*connect, *args], cwd or tmp_path, name)
            started.append(proc)
            return proc

    yield Factory()
    for proc in started:
        proc.cleanup()


@pytest.fixture
def tiny_disk(tmp_path):
    """A directory on a 64 KiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("mounting a tiny tmpfs needs root on Linux")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)
