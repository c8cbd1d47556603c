"""Every code block of docs/integrations.md, run as a reader copies it (on its own, or after the
blocks above where the page says it continues), and what the page promises checked."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")
from helpers import run_doc  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import granet  # noqa: E402
from granet.selection import select_parameters  # noqa: E402

DOC = Path(__file__).parents[2] / "docs" / "integrations.md"


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    """The page's namespace after all its blocks ran, in a folder of their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("doc"))
        namespace = run_doc(DOC)  # each block as a reader copies it
        namespace["cwd"] = Path.cwd()
    return namespace


def test_the_gpt2_trains_to_its_sparsity_and_saves_a_plain_model(doc):
    sp = doc["callback"].sparsifier
    assert sp.step == 40 and sp.sparsity() == pytest.approx(0.8, abs=1e-4)
    assert all(
        isinstance(doc["model"].get_submodule(n.rsplit(".", 1)[0]), Conv1D) for n in sp.names
    )
    assert sorted(p.name for p in (doc["cwd"] / "runs" / "gpt2-granet").glob("checkpoint-*")) == [
        "checkpoint-20",
        "checkpoint-40",
    ]
    for name, mask in sp.masks.items():
        assert not doc["sparse"].get_parameter(name)[~mask].any(), name


def test_the_vit_leaves_its_embeddings_and_head_dense(doc):
    sp = doc["vit_callback"].sparsifier
    assert not [n for n in sp.names if "embeddings" in n or "classifier" in n]
    assert sp.names[:4] == [f"vit.layers.0.attention.{p}_proj.weight" for p in "qkvo"]
    assert sp.sparsity() == pytest.approx(0.9, abs=1e-4) and sp.last_round["regrown"] > 0


def test_pytorch_attention_is_selected(doc):
    assert doc["sp"].names[:4] == [
        "layers.0.self_attn.in_proj_weight",
        "layers.0.self_attn.out_proj.weight",
        "layers.0.linear1.weight",
        "layers.0.linear2.weight",
    ]


def test_the_pruned_gpt2_keeps_its_density_while_rigl_moves_positions(doc):
    sp = doc["keep"].sparsifier
    came_in = GPT2LMHeadModel.from_pretrained(doc["cwd"] / "gpt2-sparse")
    before = {n: came_in.get_parameter(n) != 0 for n in sp.names}
    assert sp.algorithm.sparsity == sp.algorithm.init_sparsity
    assert sum(int(m.sum()) for m in sp.masks.values()) == sum(
        int(m.sum()) for m in before.values()
    )
    assert any(not torch.equal(sp.masks[n], before[n]) for n in sp.names)


def test_the_lightning_cnn_trains_to_its_sparsity(doc):
    sp = doc["lightning_callback"].sparsifier
    assert sp.step == 3 * 8 and sp.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert sp.names == ["net.0.weight", "net.3.weight", "net.6.weight"]


def test_the_shipped_file_loads_back(doc):
    for (name, a), b in zip(doc["sparse"].state_dict().items(), doc["fresh"].state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(
        doc["values"],
        doc["sparse"]
        .transformer.h[0]
        .mlp.c_fc.weight.detach()[doc["sparse"].transformer.h[0].mlp.c_fc.weight != 0],
    )


def selection_rows() -> dict[str, dict]:
    """The 'you want | write' table: each row's rules as keyword arguments."""
    section = DOC.read_text().split("## Which layers are sparse")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (.+?) \| `(\w+=.+?)`", section, re.M)
    namespace = {"granet": granet, "torch": torch}
    return {want: eval(f"dict({code})", namespace) for want, code in rows}


def test_the_selection_table_does_what_it_says():
    rows = selection_rows()
    sizes = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    untied = GPT2LMHeadModel(GPT2Config(**sizes, tie_word_embeddings=False))
    every = [n for n, _ in select_parameters(untied)]
    assert every[-1] == "lm_head.weight"

    def names(want: str) -> list[str]:
        return [n for n, _ in select_parameters(untied, **rows[want])]

    assert names("everything but embeddings and `lm_head`") == every[:-1]
    assert names("the defaults plus the embeddings")[:2] == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
    ]
    assert names("only the feed-forward layers of a GPT-2") == [
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    assert set(rows) == {
        "everything but embeddings and `lm_head`",
        "the defaults plus the embeddings",
        "only the feed-forward layers of a GPT-2",
        "no patch embedding and no head in a ViT",  # run as the ViT block's exclude
    }
