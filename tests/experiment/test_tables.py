import pytest

from granet.experiment.tables import markdown_table


def test_markdown_table_lines():
    lines = markdown_table(["name", "n"], [["a", "1"], ["b", "22"]], align="lr")
    assert lines == ["| name | n |", "|---|--:|", "| a | 1 |", "| b | 22 |"]


def test_markdown_table_defaults_and_empty_cells():
    # columns without a letter stay unmarked; an empty cell is one space, as report.md's head
    assert markdown_table(["", "", "x"], [], align="r") == ["| | | x |", "|--:|---|---|"]


def test_markdown_table_refuses_unknown_alignment():
    with pytest.raises(ValueError, match="align takes the letters l and r"):
        markdown_table(["a"], [], align="c")
