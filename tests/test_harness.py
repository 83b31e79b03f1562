"""The harness itself (conftest): a wait on a process's output fails at once when the
process exits, and a wait that times out says where the process is stuck."""

import shutil

import pytest

from conftest import READY_LINE


def test_wait_for_output_fails_at_once_when_the_process_exits(procs):
    receiver = procs.receiver("--queue-size", "0", wait_ready=False)  # exit 2: bad value
    with pytest.raises(AssertionError, match=r"process exited \(2\) before printing"):
        receiver.wait_for_output(READY_LINE)


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed")
def test_wait_for_output_timed_out_shows_the_threads(procs):
    receiver = procs.receiver("--quiet", "--no-file-log")
    with pytest.raises(AssertionError) as caught:
        receiver.wait_for_output("a line no receiver prints", timeout=1)
    assert "thread dump (py-spy)" in str(caught.value)
    assert '"MainThread"' in str(caught.value), str(caught.value)
    assert '"gatekeeper"' in str(caught.value)  # every thread named, pyzmq's ZAP thread too
    assert '"log"' in str(caught.value)
