"""Every python block of README.md and docs/*.md runs as a reader copies it: on its own, unless
the page marks it as going on from the blocks above (``<!-- continues -->``) or as a fragment
that uses names the text defines, such as your model (``<!-- fragment -->``, compiled only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import doc_blocks, run_doc

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# pages whose own test runs their blocks with run_doc, and checks what they promise
OWN_TESTS = {"integrations.md": "test_integrations.py", "extending.md": "test_extending.py"}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in OWN_TESTS], ids=str)
def test_every_block_runs_as_a_reader_copies_it(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_doc(page)


def test_the_pages_with_their_own_test_run_it_the_same_way():
    for page, test in OWN_TESTS.items():
        assert doc_blocks(ROOT / "docs" / page)
        (path,) = (ROOT / "tests").rglob(test)
        assert "run_doc(DOC" in path.read_text(), test


def test_a_block_that_uses_what_it_does_not_import_fails():
    # what the Lightning example of docs/integrations.md did: torch from a block above
    page = ROOT / "tests" / "data" / "doc-example.md"
    assert [kind for kind, _ in doc_blocks(page)] == ["run", "run", "continues", "fragment"]
    with pytest.raises(NameError, match="'torch' is not defined"):
        run_doc(page)
