"""Helpers for test_pair.py and test_cli.py: log-line parsing and cheap output tailing."""

import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

LEVELS = ("INFO   ", "WARNING", "ERROR  ")
LOG_START = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
MESSAGE_COLUMN = len("2025-10-06 13:08:22.15 - INFO    - ")


def pipe_offsets(line):
    """Column offsets of every '|' in a line."""
    return tuple(i for i, ch in enumerate(line) if ch == "|")


def log_lines(text):
    """The lines of `text` that start with a log timestamp (any precision)."""
    return [line for line in text.splitlines() if LOG_START.match(line)]


def alignment_report(lines, tag):
    """(count, distinct '|' offset tuples) over the lines containing `tag`."""
    kinds = {}
    count = 0
    for line in lines:
        if tag in line:
            count += 1
            kinds.setdefault(pipe_offsets(line), line)
    return count, kinds


def bad_prefixes(lines):
    """Log lines whose timestamp/level prefix is not the fixed-width seed format."""
    return [line for line in lines
            if not re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{2}$", line[:22])
            or line[22:25] != " - " or line[25:32] not in LEVELS or line[32:35] != " - "]


class Tail:
    """Reads a growing file incrementally, so waiting on a huge log stays cheap."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0
        self.partial = b""

    def new_lines(self):
        """Complete lines added since the last call."""
        try:
            with open(self.path, "rb") as src:
                src.seek(self.offset)
                data = src.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]

    def wait_for(self, pattern, timeout, proc=None):
        """Wait for a line matching `pattern`; fails early if `proc` exits first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.new_lines():
                if rx.search(line):
                    return line
            if proc is not None and proc.popen.poll() is not None:
                for line in self.new_lines():
                    if rx.search(line):
                        return line
                raise AssertionError(f"process exited ({proc.popen.returncode}) before"
                                     f" printing {pattern!r}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {pattern!r}")
            time.sleep(0.1)


def run_cli(script, *args, timeout=20):
    """Run a script to completion with `args`; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


def help_blocks(help_text):
    """{option: its help text, whitespace collapsed} from argparse --help output."""
    blocks, current = {}, None
    section = help_text.split("options:", 1)[-1]
    for line in section.splitlines():
        match = re.match(r"^  (-\S+)", line)
        if match:
            current = match.group(1).split(",")[-1].strip()
            if current.startswith("-h"):
                current = "--help"
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line
    return {opt: " ".join(text.split()) for opt, text in blocks.items()}

