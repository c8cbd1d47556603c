"""Memory a sparsifier adds: mask state per sparse weight, and the size of its saved state.

Counts the bytes of the tensors the sparsifier keeps on the model's device (bool masks; on CPU
also the same-dtype multipliers of the per-step path) and in host memory (bit-packed ever-active
masks for the ITOP rate); on CUDA also the allocator's view (``torch.cuda.memory_allocated``
before and after attaching). Saved state: ``torch.save(sp.state_dict())`` against
``torch.save(model.state_dict())``.

    python benchmarks/memory.py --model resnet50 --device cuda
"""

from __future__ import annotations

import argparse
import io

import torch

import granet


def saved_bytes(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def main(argv: list[str] | None = None) -> dict:
    from overhead import MODELS, describe, emit  # the same models as the overhead benchmark

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="resnet50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--quick", action="store_true", help="the small CNN (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.model = "small-cnn"
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MODELS[args.model][0]().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    sp = granet.GraNet(model, opt, sparsity=args.sparsity, total_steps=1000, update_every=100)
    after = torch.cuda.memory_allocated(device) if cuda else 0
    weights = sum(p.numel() for p in sp.params)
    tensors, multipliers = sp._targets()
    kept = {id(t): t for t in [*sp._masks, *multipliers]}
    on_device = sum(t.numel() * t.element_size() for t in kept.values())
    in_host = sp._ever_active.numel()  # one bit-packed array over all sparse layers
    result = {
        "model": args.model,
        "device": describe(device),
        "torch": torch.__version__,
        "sparse_weights": weights,
        "mask_bytes_per_weight": on_device / weights,
        "host_bytes_per_weight": in_host / weights,
        "allocator_bytes_per_weight": (after - before) / weights if cuda else None,
        "sparsifier_state_bytes": saved_bytes(sp.state_dict()),
        "model_state_bytes": saved_bytes(model.state_dict()),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
