"""The README's two commands: the install-and-run line installs the extra the command line
needs, and the test line installs what the tests need and is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def bash_block(after: str) -> str:
    return re.search(re.escape(after) + r".*?```bash\n(.*?)\n```", README, re.S).group(1)


def extras() -> tuple[dict[str, list[str]], dict]:
    """pyproject's optional dependencies and pytest options."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project["project"]["optional-dependencies"], project["tool"]["pytest"]["ini_options"]


def test_ci_runs_the_readmes_test_command():
    command = bash_block("## Tests")
    assert command.endswith("python -m pytest") and "'.[test]'" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_extras_hold_what_the_commands_need():
    optional, pytest_options = extras()
    assert "'.[cli]'" in bash_block("## Install and run")
    test = optional["test"]
    granet_extras = [e for e in test if e.startswith("granet[")]
    assert len(granet_extras) == 1 and "cli" in granet_extras[0][7:-1].split(",")
    assert {"pytest", "pytest-timeout", "hypothesis"} <= set(test)
    assert "granet[test]" in optional["dev"]
    assert pytest_options["timeout"] > 0  # every test has a limit
