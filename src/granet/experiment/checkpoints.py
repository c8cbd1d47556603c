"""A run's checkpoints: their paths, their format with a SHA-256 of their contents (checked on
every load), and the RNG state a run saves in them to resume to the bit."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from granet.checksum import state_digest
from granet.experiment.files import check_writable, tree_map, write_atomic

CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = ("best", "last")
CHECKPOINT_FORMAT = 3  # 3: the settings and a SHA-256 of the contents


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """Path of the ``which`` checkpoint (``"best"`` or ``"last"``) of a run."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}; got {which!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if torch.is_tensor(value) else value


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` with its format and checksum, atomically: a kill during the write leaves
    the previous checkpoint intact."""
    path = Path(path)
    check_writable(path)  # before mkdir, which would re-create a deleted run folder
    path.parent.mkdir(parents=True, exist_ok=True)
    body = tree_map(_to_cpu, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    full = {"format": CHECKPOINT_FORMAT, **body}
    full["sha256"] = state_digest(full)
    write_atomic(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU unless
    ``map_location``), after checking its checksum; errors name the file. Checkpoints of granet
    versions before checksums (format 2 and older) load unchecked; one of format 3 without its
    checksum is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path} (corrupt, or not one): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a granet checkpoint")
    stored = state.pop("sha256", None)
    fmt = state.get("format", 0)  # checkpoints before format 1 had no format
    if stored is None and not (type(fmt) is int and fmt < CHECKPOINT_FORMAT):
        raise ValueError(
            f"checkpoint {path} is corrupt: it has no SHA-256 of its contents, which every "
            f"checkpoint of format {CHECKPOINT_FORMAT} has (a damaged or edited file)"
        )
    if stored is not None and stored != state_digest(state):
        raise ValueError(
            f"checkpoint {path} is corrupt: its contents do not match their SHA-256 (a damaged "
            "or edited file)"
        )
    if map_location not in ("cpu", torch.device("cpu")):
        state = tree_map(lambda v: v.to(map_location) if torch.is_tensor(v) else v, state)
    return state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state a run draws from: Python, NumPy, torch, and the CUDA state of the
    run's own GPU only (asking every GPU would open a CUDA context on each, from each process)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
