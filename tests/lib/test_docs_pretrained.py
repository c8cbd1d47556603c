"""Every code block of docs/pretrained.md, each run on its own in a folder of its own (the blocks
are self-contained), and what the page promises checked."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")
pytest.importorskip("peft")

DOC = Path(__file__).parents[2] / "docs" / "pretrained.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run(index: int, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"block{index}"}
    exec(BLOCKS[index], namespace)
    return namespace


def rows_keep_half(model, names) -> bool:
    return all(
        bool((model.get_parameter(n).ne(0).sum(1) == model.get_parameter(n).shape[1] // 2).all())
        for n in names
    )


def test_the_page_has_the_six_blocks_the_tests_check():
    assert len(BLOCKS) == 6


def test_one_shot_wanda_prunes_every_row_of_every_projection_by_half(tmp_path, monkeypatch):
    ns = run(0, tmp_path, monkeypatch)
    assert ns["pruned"].sparsity() == 0.5
    names = list(ns["pruned"].masks)
    assert {n.split(".")[-2] for n in names} == PROJECTIONS
    assert rows_keep_half(ns["model"], names)
    assert (tmp_path / "llama-wanda" / "config.json").exists()


def test_init_wanda_starts_rigl_at_wandas_masks(tmp_path, monkeypatch):
    ns = run(1, tmp_path, monkeypatch)
    sp = ns["sparsifier"]
    assert sp.sparsity() == 0.5 and sp.algorithm.init == "wanda"
    assert rows_keep_half(ns["model"], sp.names)


def test_gradual_fine_tuning_in_the_trainer_reaches_the_sparsity_exactly(tmp_path, monkeypatch):
    ns = run(2, tmp_path, monkeypatch)
    sp, model = ns["callback"].sparsifier, ns["model"]
    assert sp.sparsity() == 0.5 and sp.step == 24
    assert {n.split(".")[-2] for n in sp.names} == PROJECTIONS
    total = sum(p.numel() for p in sp.params)
    assert sum(int((p == 0).sum()) for p in sp.params) == total // 2
    assert int((model.lm_head.weight == 0).sum()) == 0


def test_gradual_fine_tuning_in_lightning_reaches_the_sparsity_exactly(tmp_path, monkeypatch):
    ns = run(3, tmp_path, monkeypatch)
    sp = ns["callback"].sparsifier
    assert sp.sparsity() == 0.5 and sp.step == 16
    assert {n.split(".")[-2] for n in sp.names} == {"c_attn", "c_proj", "c_fc"}
    assert int((ns["module"].model.transformer.wte.weight == 0).sum()) == 0


def test_keep_sparse_fine_tuning_keeps_every_zero_through_resume_and_saving(tmp_path, monkeypatch):
    ns = run(4, tmp_path, monkeypatch)
    pairs = ns["pairs"]
    assert all(torch.equal(p == 0, q == 0) for p, q in pairs)
    assert any(not torch.equal(p, q) for p, q in pairs)  # and it trained
    assert sum(int((p == 0).sum()) for p, _ in pairs) > 0


def test_lora_merges_without_filling_a_zero(tmp_path, monkeypatch):
    ns = run(5, tmp_path, monkeypatch)
    merged, masks = ns["merged"], ns["masks"]
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(merged.get_parameter(name) != 0, mask), name
    assert (tmp_path / "llama-pruned-lora" / "config.json").exists()
