"""Pretrained transformers made sparse (docs/pretrained.md): the four journeys, measured on a
small Llama-style or GPT-2 language model trained here on real text.

The text is the Python documentation's topic pages that ship with CPython (``pydoc_data.topics``,
about 465k characters of English), as bytes (a 256-token vocabulary, no tokenizer); the last
10% is held out. The script trains the dense model (the "pretrained" checkpoint), then:

1. one-shot 50%: magnitude (one global threshold, per layer, per output row) and Wanda (per
   output row, calibration: 8 batches of training text), held-out loss without fine-tuning;
2. gradual fine-tuning from the dense weights: GMP and GraNet from ``init_sparsity=0`` to 50%;
3. keep-sparse fine-tuning of the Wanda-pruned model (``init="existing"``, static masks);
4. LoRA on the Wanda-pruned model with ``granet.integrations.peft.keep_sparse``, merged;

and, as the reference, the dense model fine-tuned as long. The attention and MLP projections are
sparse; embeddings, norms and the LM head stay dense. Prints a markdown table and writes JSON.

    python benchmarks/pretrained.py --model llama --out pretrained.json

``--checkpoint DIR`` saves the trained dense model there, or reuses it if the folder exists.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time

import torch
from torch import nn

import granet
from granet.oneshot import prune


def corpus() -> torch.Tensor:
    """The bytes of CPython's pydoc topic pages, in key order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def build(kind: str, length: int, hidden: int, layers: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=256, hidden_size=hidden, intermediate_size=3 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=length,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=256, n_embd=hidden, n_layer=layers, n_head=4, n_positions=length,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class Windows:
    """Random training windows of ``length`` tokens; fixed held-out windows."""

    def __init__(self, tokens: torch.Tensor, length: int, batch: int) -> None:
        split = int(0.9 * len(tokens))
        self.train, self.held_out = tokens[:split], tokens[split:]
        self.length, self.batch = length, batch
        self.generator = torch.Generator().manual_seed(0)

    def next(self) -> torch.Tensor:
        starts = torch.randint(
            0, len(self.train) - self.length, (self.batch,), generator=self.generator
        )
        return torch.stack([self.train[s : s + self.length] for s in starts])

    def next_batches(self, count: int) -> None:
        """Draw ``count`` batches and drop them."""
        for _ in range(count):
            self.next()

    def evaluation(self, count: int = 128) -> list[torch.Tensor]:
        step = (len(self.held_out) - self.length) // count
        windows = [self.held_out[i * step : i * step + self.length] for i in range(count)]
        return [torch.stack(windows[i : i + 32]) for i in range(0, count, 32)]


def held_out_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model: nn.Module, data: Windows, steps: int, lr: float, sparsifier=None, params=None):
    """AdamW for ``steps`` steps, linear warm-up over the first 10%; a sparsifier factory
    ``sparsifier(model, optimizer)`` is attached first. Returns the sparsifier (or None)."""
    params = params if params is not None else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    sp = sparsifier(model, optimizer) if sparsifier else None
    model.train()
    for _ in range(steps):
        ids = data.next()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return sp


def sparse_names(model: nn.Module) -> list[str]:
    return [n for n, _ in granet.selection.select_parameters(model, exclude=["lm_head.*"])]


def sparsity(model: nn.Module, names: list[str]) -> float:
    weights = [model.get_parameter(n) for n in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--oneshot-only", action="store_true", help="stop after the one-shot rows")
    parser.add_argument(
        "--checkpoint", default=None, help="folder of the pretrained model: saved, or reused"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    data = Windows(corpus(), args.length, args.batch)
    evaluation = data.evaluation()
    rows: list[dict] = []

    def row(journey: str, model: nn.Module, seconds: float, names: list[str], **extra) -> None:
        rows.append(
            {
                "journey": journey,
                "held_out_loss": held_out_loss(model, evaluation),
                "sparsity": sparsity(model, names),
                "seconds": seconds,
                **extra,
            }
        )
        r = rows[-1]
        print(f"{journey:55s} loss {r['held_out_loss']:.4f}  sparsity {r['sparsity']:.4f}  "
              f"{seconds:7.1f} s", flush=True)  # fmt: skip

    dense = build(args.model, args.length, args.hidden, args.layers)
    names = sparse_names(dense)
    row("untrained", dense, 0.0, names)
    start = time.perf_counter()
    if args.checkpoint and os.path.isdir(args.checkpoint):  # pretrained by an earlier run
        dense = type(dense).from_pretrained(args.checkpoint)
        data.next_batches(args.pretrain_steps)  # the same draws as the run that trained it
    else:
        train(dense, data, args.pretrain_steps, 3e-3)
        if args.checkpoint:
            dense.save_pretrained(args.checkpoint)
    row("dense, trained (the 'pretrained' checkpoint)", dense, time.perf_counter() - start, names)

    # 1. one-shot
    calibration = [{"input_ids": data.next()[:8]} for _ in range(8)]
    pruned = {}
    for label, kw in (
        ("magnitude, global", dict(pruning="global")),
        ("magnitude, per layer", dict(pruning="uniform")),
        ("magnitude, per output row", dict(pruning="row")),
        ("wanda, per layer", dict(score="wanda", calibration=calibration, pruning="uniform")),
        ("wanda, per output row", dict(score="wanda", calibration=calibration)),
    ):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        prune(model, args.sparsity, exclude=["lm_head.*"], **kw)
        row(f"one-shot {label}", model, time.perf_counter() - start, names)
        pruned[label] = model

    if not args.oneshot_only:
        fine_tune(args, dense, pruned, data, names, row)
    report(args, rows)


def fine_tune(args, dense, pruned, data, names, row) -> None:
    """Journeys 2-4 and the dense reference, each ``args.finetune_steps`` steps."""
    steps = args.finetune_steps
    # reference: the dense model fine-tuned as long
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    train(model, data, steps, 1e-3)
    row(f"dense, fine-tuned {steps} steps (reference)", model, time.perf_counter() - start, names)

    # 2. gradual fine-tuning from the dense weights
    every = max(steps // 15, 1)
    for method in ("gmp", "granet"):
        model = copy.deepcopy(dense)
        start = time.perf_counter()

        def attach(m, opt, method=method):
            return granet.sparsify(
                m, opt, method, sparsity=args.sparsity, init_sparsity=0.0, total_steps=steps,
                update_every=every, prune_end=0.6, exclude=["lm_head.*"],
            )  # fmt: skip

        train(model, data, steps, 1e-3, attach)
        row(f"{method} 0 -> {args.sparsity:.0%} over {steps} steps", model,
            time.perf_counter() - start, names)  # fmt: skip

    # 3. keep-sparse fine-tuning of the one-shot models
    for label in ("magnitude, global", "wanda, per output row"):
        model = copy.deepcopy(pruned[label])
        start = time.perf_counter()

        def keep(m, opt):
            return granet.Static(m, opt, init="existing", total_steps=steps, exclude=["lm_head.*"])

        train(model, data, steps, 1e-3, keep)
        row(f"one-shot {label} + keep-sparse {steps} steps", model,
            time.perf_counter() - start, names)  # fmt: skip

    # 4. LoRA on the Wanda-pruned model, merged
    from peft import LoraConfig, get_peft_model

    from granet.integrations.peft import keep_sparse, merge_and_unload

    model = copy.deepcopy(pruned["wanda, per output row"])
    before = {n: model.get_parameter(n) != 0 for n in names}
    targets = sorted({n.split(".")[-2] for n in names})
    start = time.perf_counter()
    peft_model = keep_sparse(
        get_peft_model(
            model,
            LoraConfig(
                r=8, lora_alpha=16, target_modules=targets, fan_in_fan_out=args.model == "gpt2"
            ),
        )
    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    train(peft_model, data, steps, 3e-3, params=trainable)
    merged = merge_and_unload(peft_model)
    exact = all(torch.equal(merged.get_parameter(n) != 0, before[n]) for n in names)
    row(f"one-shot wanda + LoRA r=8 {steps} steps, merged", merged,
        time.perf_counter() - start, names, zeros_kept_exactly=exact)  # fmt: skip


def report(args, rows) -> None:
    """The markdown table on stdout, and everything as JSON in ``args.out``."""
    print()
    print("| journey | held-out loss | sparsity | time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['journey']} | {r['held_out_loss']:.3f} | {r['sparsity']:.4f} | "
              f"{r['seconds']:.1f} |")  # fmt: skip
    print(f"\n(held-out loss in nats per byte; ln 256 = {math.log(256):.3f} is a uniform guess)")
    result = {
        "args": vars(args),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
