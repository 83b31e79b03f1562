"""The README's configuration tables and test command match the code."""

import re

import pytest

from conftest import ROOT, load_script

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
