"""granet.integrations.peft: LoRA on a pruned Llama-style and GPT-2 model keeps the zeros,
in training and through the merge."""

import copy

import pytest
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from granet.integrations.peft import keep_sparse, merge_and_unload  # noqa: E402
from granet.oneshot import prune  # noqa: E402


def llama() -> tuple[torch.nn.Module, LoraConfig]:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets)


def gpt2() -> tuple[torch.nn.Module, LoraConfig]:
    model = tiny_gpt2()
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    return model, lora


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed))


def pruned_with_lora(make) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A pruned model in float64 with LoRA adapters, trained a few steps with keep_sparse."""
    model, lora = make()
    model.double()
    masks = prune(model, 0.5, score="wanda", calibration=[{"input_ids": tokens(4, 1)}]).masks
    peft_model = keep_sparse(get_peft_model(model, lora))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        ids = tokens(4, 10 + step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model, masks


def tolerance(model: torch.nn.Module, logits: torch.Tensor) -> float:
    """Two orders of the same sums: each output is a chain of dot products, one per layer, so
    the rounding is bounded by eps x (the summed inner sizes of every linear map) x the size
    of the values."""
    inner = sum(p.shape[-1] if p.dim() == 2 else 0 for p in model.parameters())
    return torch.finfo(logits.dtype).eps * inner * float(logits.abs().max())


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_the_merged_model_is_the_trained_one_and_keeps_every_zero(make):
    peft_model, masks = pruned_with_lora(make)
    peft_model.eval()
    ids = tokens(3, 99)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = merge_and_unload(peft_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        plain = merged(input_ids=ids).logits
    assert (plain - adapted).abs().max() <= tolerance(merged, adapted)
    moved = 0
    for name, mask in masks.items():
        weight = merged.get_parameter(name)
        assert torch.equal(weight != 0, mask), name  # every zero kept, none added
        moved += int((weight != 0).sum())
    assert moved == sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_the_adapters_train_and_change_the_kept_weights(make):
    model, lora = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune(model, 0.5).masks
    pruned = {n: model.get_parameter(n).detach().clone() for n in masks}
    peft_model = keep_sparse(get_peft_model(model, lora))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = tokens(4, step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = merge_and_unload(peft_model)
    for name, mask in masks.items():
        weight = merged.get_parameter(name).detach()
        adapted = any(f".{t}." in name for t in lora.target_modules)  # not Llama's lm_head
        assert torch.equal(weight, pruned[name]) != adapted, name  # the adapters moved these
        assert torch.equal(weight != 0, mask), name
    assert torch.equal(merged.get_parameter(next(iter(before))), before[next(iter(before))])


def test_peft_s_own_merge_fills_the_zeros_the_masked_one_keeps():
    model, lora = llama()
    masks = prune(model, 0.5).masks
    peft_model = get_peft_model(model, lora)
    for layer in peft_model.modules():
        if hasattr(layer, "lora_B"):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b.weight)  # as after training
    merged = peft_model.merge_and_unload()
    adapted = [n for n in masks if n != "lm_head.weight"]
    assert sum(int((~masks[n]).sum()) for n in adapted) > 0
    assert sum(int((merged.get_parameter(n) == 0).sum()) for n in adapted) == 0


def test_a_merge_without_known_masks_is_refused_in_one_line():
    model, lora = llama()
    prune(model, 0.5)
    peft_model = get_peft_model(model, lora)
    with pytest.raises(ValueError, match=r"^peft_model: the masks of its base are unknown[^\n]*$"):
        merge_and_unload(peft_model)
    with pytest.raises(ValueError, match=r"^peft_model: holds no LoRA layer"):
        keep_sparse(llama()[0])


def test_adapters_saved_and_loaded_again_are_masked_again_by_keep_sparse(tmp_path):
    from peft import PeftModel

    model, lora = gpt2()
    prune(model, 0.5)
    base = copy.deepcopy(model)
    peft_model = keep_sparse(get_peft_model(model, lora))
    for layer in peft_model.modules():
        if hasattr(layer, "lora_B"):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b.weight)  # as after training
    peft_model.save_pretrained(tmp_path)
    assert not any("granet" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = keep_sparse(PeftModel.from_pretrained(base, tmp_path))
    ids = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)
