"""The demo runs the real pair once and ends with both summaries and what to look for."""

import re
import subprocess
import sys

from conftest import ROOT


def test_demo_runs_the_pair_and_ends_with_both_summaries():
    """demo.py exits 0 and its last lines hold both summary tables, then 'What to look for'."""
    result = subprocess.run([sys.executable, str(ROOT / "demo.py")], capture_output=True,
                            text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    tail = result.stdout.split("demo: both summaries together", 1)[1]
    sender = tail.index("==== Sender summary ====")
    receiver = tail.index("==== Receiver summary ====")
    look = tail.index("What to look for:")
    assert sender < receiver < look
    assert re.search(r"^  planned +200$", tail, re.M) and re.search(r"^  received +200$", tail, re.M)
