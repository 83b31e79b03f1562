"""The README's 20-line PUSH/PULL core runs as printed: ten messages from push.py reach pull.py."""

import re
import subprocess
import sys

from conftest import ROOT, free_port, wait_until

SNIPPET = re.compile(r"```python\n(# (pull|push)\.py:.*?)```", re.S)


def readme_snippets():
    """{'pull': code, 'push': code} from the README's 'The pattern in 20 lines'."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {name: code for code, name in SNIPPET.findall(text)}


def test_pattern_in_20_lines_delivers_ten_messages(tmp_path):
    """pull.py and push.py, on a free port, move all ten tasks; together about 20 lines."""
    snippets = readme_snippets()
    assert set(snippets) == {"pull", "push"}
    lines = sum(1 for code in snippets.values() for line in code.splitlines()
                if line.strip() and not line.lstrip().startswith("#"))
    assert lines <= 25, f"the core has {lines} lines of code"
    port = str(free_port())
    for name, code in snippets.items():
        (tmp_path / f"{name}.py").write_text(code.replace("5560", port), encoding="utf-8")
    out = tmp_path / "pull.out"
    with open(out, "wb") as sink:
        pull = subprocess.Popen([sys.executable, "-u", "pull.py"], cwd=tmp_path, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        push = subprocess.run([sys.executable, "push.py"], cwd=tmp_path, timeout=30,
                              capture_output=True, text=True)
        assert push.returncode == 0, push.stderr
        received = wait_until(lambda: out.read_text().count("received") >= 10 and out.read_text(),
                              20, "ten received lines")
        assert [f"received Pusher-1 - Task {k}" for k in range(10)] == \
            [line for line in received.splitlines() if line.startswith("received")]
    finally:
        pull.kill()
        pull.wait(10)
