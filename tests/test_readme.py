"""The README's configuration tables and test command match the code."""

import re
import shlex

import pytest

from conftest import ROOT, free_port, load_script

ROW = re.compile(r"^\| `(?P<constant>[A-Z_]+)` \| `(?P<flag>--[a-z-]+)` \| `(?P<default>[^`]*)` \|")
PARENTHESES = re.compile(r"\(([^()]*)\)")
CAPITALS = re.compile(r"\b[A-Z][A-Z_]{2,}\b")


def table_rows(heading):
    """(constant, flag, default) rows of the table under a '## ... heading' of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [(m["constant"], m["flag"], m["default"])
            for m in map(ROW.match, section.splitlines()) if m]


def flags_by_constant(module):
    """constant name -> flags whose --help names it in parentheses, from the script's parser."""
    found = {}
    for action in module.build_parser()._actions:
        for group in PARENTHESES.findall(action.help or ""):
            for constant in CAPITALS.findall(group):
                if hasattr(module, constant):
                    found.setdefault(constant, set()).update(action.option_strings)
    return found


@pytest.mark.parametrize("script,heading", [
    ("async-socket-receiver", "Receiver configuration"),
    ("async-socket-sender", "Sender configuration"),
])
def test_configuration_table_matches_the_code(script, heading):
    """Every row names a real constant, its real default and a flag that sets it; none missing."""
    module = load_script(script)
    rows = table_rows(heading)
    assert rows, f"no configuration table under '{heading}'"
    flags = flags_by_constant(module)
    for constant, flag, default in rows:
        assert hasattr(module, constant), f"README names {constant}, the script has none"
        assert repr(getattr(module, constant)) == default, \
            f"{constant}: README says {default}, the code says {getattr(module, constant)!r}"
        assert flag in flags.get(constant, ()), f"{constant}: {flag} does not set it"
    documented = {constant for constant, _, _ in rows}
    assert set(flags) <= documented, f"constants with a flag but no README row:" \
                                     f" {sorted(set(flags) - documented)}"


def test_readme_test_command_is_what_ci_runs():
    """.ci/run runs exactly the README's test command, and installs the dev requirements."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ci[-1] == "python3 -m pytest"
    assert "python3 -m pytest" in readme
    assert any("requirements-dev.txt" in line for line in ci)


# --- The README's example blocks, run as written (receiver first) ---------------------
#
# Every `python3 async-socket-sender.py ...` line of a ```bash block runs against the
# `python3 async-socket-receiver.py ...` line nearest above it in the README, started
# first and waited for (`Server is running`). The changes made, and only these:
# - the receiver: `--port` and `--confirm-port` on free ports, `--bind 127.0.0.1`,
#   `--no-file-log`, and `--json` into the test's directory (also its working directory,
#   so `--csv receiver.csv` and the spill file land there);
# - the sender: `--connect` to that receiver, the same `--confirm-port`, `--json` there;
# - durations capped (CAPS): `--messages` at most 2, `--duration` 2 s, `--warmup` 0.5 s,
#   `--step-duration` 1 s; a sender without `--messages`/`--duration` gets `--messages 2`
#   (the seed's 200 messages take the receiver 20 s); `--find-max` gets `--precision 25`
#   (fewer steps).

BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
COMMAND = re.compile(r"^python3 (async-socket-(receiver|sender))\.py(.*)$")
CAPS = {"--messages": 2, "--duration": 2.0, "--warmup": 0.5, "--step-duration": 1.0}
FIND_MAX_EXTRA = ["--precision", "25"]
RUN_COMPLETE = r"\[RUN\] run \w+ \| received (\d+)/\1 \| missing 0 "
FIND_MAX_ANSWER = r"max sustainable rate: \d+ msg/s"
FIND_MAX_BELOW = r"max sustainable rate: below the start rate"


def readme_commands():
    """[(side, args)] of the README's ```bash blocks, in order; comments and line
    continuations undone."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for block in BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            match = COMMAND.match(" ".join(words))
            if match:
                found.append((match[2], shlex.split(match[3])))
    return found


def readme_examples():
    """[(receiver args, sender args)]: each sender command with the receiver above it."""
    examples, receiver = [], None
    for side, args in readme_commands():
        if side == "receiver":
            receiver = args
        else:
            assert receiver is not None, f"sender example before any receiver: {args}"
            examples.append((receiver, args))
    return examples


def capped(args):
    """The sender's args with the durations in CAPS capped (see above)."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in CAPS and float(out[i + 1]) > CAPS[word]:
            out[i + 1] = f"{CAPS[word]:g}"
    if not {"--messages", "--duration", "--find-max"} & set(out):
        out += ["--messages", f"{CAPS['--messages']}"]
    return out + (FIND_MAX_EXTRA if "--find-max" in out else [])


def expected_lines(sender_args):
    """(receiver pattern, sender pattern) the README quotes for this kind of run."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if "--find-max" in sender_args:
        assert "`max sustainable rate: R msg/s ...`" in readme
        assert "1 when even the first" in readme  # the other answer it may truly give
        return None, FIND_MAX_ANSWER
    assert "`received 200/200 | missing 0`" in readme
    return RUN_COMPLETE, None


def test_readme_examples_are_found():
    """The README's examples: by hand, four tuning lines, load test, --find-max, --processes."""
    examples = readme_examples()
    assert len(examples) >= 8, examples
    assert "Server is running" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("receiver_args,sender_args", readme_examples(),
                         ids=lambda args: "_".join(a.lstrip("-") for a in args[:6]) or "defaults")
def test_readme_example_runs_as_written(procs, receiver_args, sender_args):
    """The example exits 0, and prints the lines the README quotes; the receiver too."""
    confirm_port = free_port()
    receiver = procs.receiver(*receiver_args, "--confirm-port", str(confirm_port),
                              "--no-file-log")
    sender = procs.sender(*capped(sender_args), "--confirm-port", str(confirm_port),
                          endpoints=[receiver.endpoint])
    receiver_pattern, sender_pattern = expected_lines(sender_args)
    status = sender.wait(50)
    if sender_pattern == FIND_MAX_ANSWER and status == 1 and sender.lines(FIND_MAX_BELOW):
        # A busy machine may fail even the first step's p99 gate: the README says that
        # answer too (exit 1). What the example must never do is exit otherwise.
        sender_pattern = FIND_MAX_BELOW
    else:
        assert status == 0, sender.output()[-3000:]
    if sender_pattern:
        assert sender.lines(sender_pattern), sender.output()[-3000:]
    if receiver_pattern:
        receiver.wait_for_output(receiver_pattern, timeout=40)
    assert receiver.stop() == 0, receiver.output()[-3000:]


# --- docs/json.md's `config` lists are the keys the scripts write -----------------------

def documented_config_keys(side):
    """The keys docs/json.md lists in its `config` row under '## Receiver' / '## Sender'."""
    text = (ROOT / "docs" / "json.md").read_text(encoding="utf-8")
    section = text.split(f"## {side}\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| `config` |"))
    listed = re.split(r"\(and any setting|; key material", row, maxsplit=1)[0]
    return set(re.findall(r"`([a-z_0-9]+)`", listed)) - {"config"}


def test_json_config_lists_are_what_the_scripts_write(procs):
    """A one-message run: the `config` keys of both --json summaries are docs/json.md's."""
    receiver = procs.receiver("--processing-time", "0", "--no-file-log")
    sender = procs.sender("--workers", "1", "--messages", "1", "--delay", "0",
                          endpoints=[receiver.endpoint])
    assert sender.wait(30) == 0, sender.output()[-3000:]
    assert receiver.stop() == 0, receiver.output()[-3000:]
    assert set(receiver.summary()["config"]) == documented_config_keys("Receiver")
    assert set(sender.summary()["config"]) == documented_config_keys("Sender")


# --- The README quotes only figures of bench/LATEST.md ---------------------------------

FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(msg/s|ms|MB|s|×)(?![\w/])")


def test_performance_figures_are_in_the_latest_benchmark():
    """Every number before msg/s, ms, MB, s or × in '## Performance' is in bench/LATEST.md,
    which names its machine and its commit."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    latest = (ROOT / "bench" / "LATEST.md").read_text(encoding="utf-8")
    assert re.search(r"^Machine: \S", latest, re.M), "bench/LATEST.md names no machine"
    assert re.search(r"\bcommit [0-9a-f]{7,40}\b", latest), "bench/LATEST.md names no commit"
    figures = [number for number, _ in FIGURE.findall(section)]
    assert figures, "the Performance section quotes no figure"
    for number in figures:
        assert re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d,]|\.\d)", latest), \
            f"README quotes {number}, which bench/LATEST.md does not have"


# --- Every relative link and #anchor of README.md and docs/*.md resolves ----------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    seen, found = {}, set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", ["README.md", *sorted(
    f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    """Each relative link names an existing file, and each #anchor a heading of it."""
    source = ROOT / page
    broken = []
    for target in LINK.findall(FENCE.sub("", source.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page}: links that do not resolve: {broken}"
