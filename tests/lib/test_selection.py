"""Which tensors are sparse: the default (convolutions, linears, attention, GPT-2's Conv1D, never
embeddings), module-type and pattern rules, shared tensors, and the optimizer wrappers."""

import sys
import types

import pytest
import torch
from torch import nn

from granet.selection import default_include, select_parameters, unwrap, unwrap_optimizer


def names(model, **rules):
    return [n for n, _ in select_parameters(model, **rules)]


class Block(nn.Module):
    """Attention, a feed-forward pair, a norm, an embedding and a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_the_default_takes_weight_matrices_and_attention_but_not_embeddings():
    assert names(Block()) == [
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "ff.0.weight",
        "ff.2.weight",
    ]


def test_attention_with_other_key_and_value_sizes_has_three_projections():
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert names(attn) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_patterns_add_embeddings_and_leave_out_heads():
    model = Block()
    assert names(model, include=[*default_include(), nn.Embedding])[0] == "embed.weight"
    assert names(model, include=["embed.*", "ff.*"], exclude=["*.bias"]) == [
        "embed.weight",
        "ff.0.weight",
        "ff.2.weight",
    ]
    assert "ff.2.weight" not in names(model, exclude=["ff.2.*"])
    assert names(model, include=[nn.MultiheadAttention]) == ["attn.in_proj_weight"]


def tied_lm() -> nn.Module:
    model = nn.Module()
    model.wte = nn.Embedding(50, 8)
    model.fc = nn.Linear(8, 8)
    model.lm_head = nn.Linear(8, 50, bias=False)
    model.lm_head.weight = model.wte.weight
    return model


def test_a_head_tied_to_an_embedding_is_left_out_by_default():
    model = tied_lm()
    assert names(model) == ["fc.weight"]
    # explicit rules are followed as written; exclude, checked on every holder, wins
    assert names(model, include=[nn.Linear]) == ["wte.weight", "fc.weight"]
    assert names(model, include=[nn.Linear], exclude=["wte.*"]) == ["fc.weight"]


def test_frozen_parameters_are_left_out():
    model = Block()
    model.ff[0].weight.requires_grad_(False)
    assert "ff.0.weight" not in names(model)


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="nn.Module subclasses or name patterns"):
        select_parameters(Block(), include=[3])


def test_hugging_face_conv1d_is_found_without_importing_transformers(monkeypatch):
    # a stand-in for transformers.pytorch_utils: the default looks it up only once loaded
    class Conv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 24))  # (in, out), GPT-2's layout
            self.bias = nn.Parameter(torch.zeros(24))

    model = nn.Sequential(Conv1D(), nn.Linear(24, 4))
    assert names(model) == ["1.weight"]  # not the Conv1D transformers may have loaded
    fake = types.ModuleType("transformers.pytorch_utils")
    fake.Conv1D = Conv1D
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", fake)
    assert Conv1D in default_include()
    assert names(model) == ["0.weight", "1.weight"]


def test_gpt2_sparsifies_its_conv1d_weights_and_no_embedding():
    transformers = pytest.importorskip("transformers")
    sizes = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**sizes))
    assert names(model) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    untied = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**sizes, tie_word_embeddings=False)
    )
    assert names(untied)[-1] == "lm_head.weight"
    assert "lm_head.weight" not in names(untied, exclude=["lm_head.*"])


class Wrapper:
    """A framework's optimizer wrapper: holds the optimizer, has no step hooks of its own."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


def test_optimizer_wrappers_are_unwrapped():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        unwrap_optimizer(Wrapper(None))


def test_data_parallel_wrappers_are_unwrapped():
    net = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(nn.DataParallel(net))) is net


def test_a_pattern_that_matches_nothing_is_named_in_a_warning():
    import warnings

    import granet

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning) as caught:
        sp = granet.Static(
            model,
            optimizer,
            total_steps=10,
            include=["0.weight", "typo.weight", nn.Conv2d],  # a type rule is not a typo
            exclude=["typo.*", "1.bias"],
        )
    said = [str(w.message) for w in caught]
    assert any("include pattern(s) 'typo.weight' match no parameter" in m for m in said), said
    assert any("exclude pattern(s) 'typo.*' match no parameter" in m for m in said), said
    assert not any("'0.weight'" in m.split("such as")[0] or "1.bias" in m for m in said)
    sp.remove()
    with warnings.catch_warnings():  # every pattern matching: no warning
        warnings.simplefilter("error")
        sp = granet.Static(model, optimizer, total_steps=10, include=["*.weight"], exclude=["1.*"])
    sp.remove()
    with pytest.raises(ValueError, match=r"no sparse tensors selected: .*'typo\.\*' match no"):
        granet.Static(model, optimizer, total_steps=10, include=["typo.*"])


def test_a_model_on_the_meta_device_is_one_line():
    import granet

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the model's weights are on the meta device") as error:
        granet.GraNet(model, optimizer, total_steps=100, update_every=10)
    assert "\n" not in str(error.value)
