"""docs/cli.md's promises section names the tests that pin each promise: they exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def promises() -> str:
    text = (ROOT / "docs" / "cli.md").read_text()
    start = text.index("\n## Promises\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_every_test_the_promises_name_exists():
    named = []
    for row in promises().splitlines():
        if not row.startswith("|") or row.startswith("|---"):
            continue
        last_file = None
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(\w+)`", row):
            last_file = file or last_file
            named.append((last_file, name))
    assert len(named) >= 15
    for file, name in named:
        assert file is not None, name
        (path,) = (ROOT / "tests").rglob(file)  # in the folder of its layer
        source = path.read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} is not a test"
