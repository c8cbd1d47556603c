"""Pretrained transformers made sparse and kept sparse, in the Hugging Face Trainer and Lightning:
gradual fine-tuning from dense weights, keep-sparse fine-tuning of a one-shot-pruned model
through checkpoints, resume and save_pretrained, and the refusal of a checkpoint whose zeros do
not match its masks. Tiny Llama-style and GPT-2 models built from configs (CPU, no downloads)."""

import re

import pytest
import torch
from helpers import Tokens, tiny_gpt2, tiny_llama
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from granet.integrations.hf import GraNetCallback  # noqa: E402
from granet.oneshot import prune  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trainer(out, model, callbacks, **args) -> Trainer:
    settings = dict(
        max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=4,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_only_model=False,
    )  # fmt: skip
    arguments = TrainingArguments(str(out), **{**settings, **args})
    return Trainer(model=model, args=arguments, train_dataset=Tokens(), callbacks=callbacks)


def zeros(model: nn.Module) -> dict[str, int]:
    return {n: int((p == 0).sum()) for n, p in model.named_parameters()}


def test_gradual_fine_tuning_of_a_pretrained_llama_reaches_the_sparsity_exactly(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "pretrained")  # stands for a downloaded checkpoint
    model = LlamaForCausalLM.from_pretrained(tmp_path / "pretrained")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = GraNetCallback(
        "granet", sparsity=0.5, init_sparsity=0.0, update_every=2, exclude=["lm_head.*"]
    )
    trainer(tmp_path / "run", model, [callback]).train()
    sp = callback.sparsifier
    assert sp.algorithm.init_sparsity == 0.0 and sp.step == 8
    assert sorted({n.split(".")[-2] for n in sp.names}) == sorted(PROJECTIONS)
    assert len(sp.names) == 2 * len(PROJECTIONS)
    total = sum(p.numel() for p in sp.params)
    assert sum(zeros(model)[n] for n in sp.names) == total - round(0.5 * total)
    for name in zeros(model):
        if name not in sp.names:  # embeddings, norms, lm_head: no zeros of granet's
            assert zeros(model)[name] == int((before[name] == 0).sum()), name


def test_keep_sparse_fine_tuning_survives_checkpoints_resume_and_save_pretrained(tmp_path):
    model = tiny_llama()
    calibration = [{"input_ids": Tokens(8, seed=3).ids[i : i + 4]} for i in (0, 4)]
    masks = prune(model, 0.5, score="wanda", calibration=calibration).masks
    model.save_pretrained(tmp_path / "pruned")
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    first = trainer(tmp_path / "run", pruned, [GraNetCallback("static", init="existing")])
    first.train()
    # a second process resumes the run from its first checkpoint and finishes it
    again = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    resumed = trainer(tmp_path / "run", again, [GraNetCallback("static", init="existing")])
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    resumed.save_model(str(tmp_path / "final"))
    final = LlamaForCausalLM.from_pretrained(tmp_path / "final")
    for name, mask in masks.items():
        weight = final.get_parameter(name)
        assert torch.equal(weight != 0, mask), name  # the zeros exactly where they were
        assert not torch.equal(weight, model.get_parameter(name)), name  # and it trained
        assert torch.equal(weight, pruned.get_parameter(name)), name  # as the uninterrupted run


def test_a_checkpoint_whose_zeros_do_not_match_its_masks_is_refused(tmp_path):
    model = tiny_gpt2()
    prune(model, 0.5)
    trainer(tmp_path, model, [GraNetCallback("static", init="existing")]).train()
    weights = tmp_path / "checkpoint-4" / "model.safetensors"
    state = load_file(weights)
    name = "transformer.h.1.mlp.c_fc.weight"
    state[name][state[name] == 0] = 0.5  # someone edited the weights, not the masks
    save_file(state, weights, metadata={"format": "pt"})
    t = trainer(tmp_path, tiny_gpt2(), [GraNetCallback("static", init="existing")])
    where = re.escape(str(tmp_path / "checkpoint-4" / "granet_sparsifier.pt"))
    with pytest.raises(ValueError, match=rf"^{where}: resume: the checkpoint's {name} has \d+"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


pl = pytest.importorskip("lightning.pytorch")
from granet.integrations.lightning import GraNetCallback as LightningGraNet  # noqa: E402


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained by Lightning."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained gives it in eval mode

    def training_step(self, batch, index):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(root, module, callback, ckpt_path=None, steps=8):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=4)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_gradual_fine_tuning_in_lightning_reaches_the_sparsity_exactly(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "pretrained")
    module = CausalLM(GPT2LMHeadModel.from_pretrained(tmp_path / "pretrained"))
    before = zeros(module)
    callback = LightningGraNet("gmp", sparsity=0.6, update_every=2)
    fit(tmp_path, module, callback)
    sp = callback.sparsifier
    assert sp.algorithm.init_sparsity == 0.0 and sp.step == 8
    assert {n.split(".")[-2] for n in sp.names} == {"c_attn", "c_proj", "c_fc"}
    total = sum(p.numel() for p in sp.params)
    after = zeros(module)
    assert sum(after[n] for n in sp.names) == total - round(0.4 * total)
    dense = [n for n in after if n not in sp.names]
    assert "model.transformer.wte.weight" in dense  # GPT-2's tied lm_head with it
    assert all(after[n] <= before[n] for n in dense)  # biases start at zero and train


def test_lightning_refuses_a_checkpoint_whose_zeros_do_not_match_its_masks(tmp_path):
    model = tiny_gpt2()
    prune(model, 0.5)
    trainer = fit(tmp_path, CausalLM(model), LightningGraNet("static", init="existing"))
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    name = "model.transformer.h.0.attn.c_attn.weight"
    checkpoint["state_dict"][name][0, :] = 1.0
    torch.save(checkpoint, path)
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{where}: resume: the checkpoint's {name} has \d+"):
        fit(tmp_path, CausalLM(tiny_gpt2()), LightningGraNet("static", init="existing"), path)
