"""A run folder: the files in it, its checkpoints, and the model it trained.

Layout of ``RUN_DIR``::

    config.yaml            the resolved settings (``granet train --config`` reads it back)
    metrics.jsonl          one JSON line per finished epoch
    checkpoints/last.pt    everything needed to resume exactly (also written on Ctrl-C/SIGTERM)
    checkpoints/best.pt    the weights and masks of the best epoch by validation accuracy
    report.json, report.md, *.png
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = ("best", "last")


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """Path of the ``which`` checkpoint (``"best"`` or ``"last"``) of a run."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}; got {which!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def prepare_run_dir(run_dir: str | Path, overwrite: bool = False) -> Path:
    """Create an empty run folder; an existing one is refused unless ``overwrite``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"run folder {run_dir} already exists: use --resume {run_dir} to continue it "
                "or --overwrite to start it again"
            )
        if not is_run_dir(run_dir):
            raise FileExistsError(
                f"{run_dir} is not a granet run folder (no {CONFIG_FILE}); "
                "refusing to delete it for --overwrite"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def default_run_dir(config: Any, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-<dataset>-<model>-<method>[-s<sparsity>]-seed<seed>``, unused."""
    sparsity = "" if config.method == "dense" else f"-s{config.sparsity:g}"
    name = (
        f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.model}-{config.method}"
        f"{sparsity}-seed{config.seed}"
    )
    path, n = Path(root) / name, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{n}"
    return path


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was trained with (its ``config.yaml``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a granet run folder: no {CONFIG_FILE}")
    return yaml.safe_load(path.read_text())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty before the first epoch ends)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {REPORT_JSON}: the run has not finished")
    return json.loads(path.read_text())


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run (in eval mode, on the CPU) and its settings.

    The architecture is the one named in ``config.yaml``, built for the data shape recorded in
    the checkpoint; the weights are those of the ``which`` checkpoint (masked weights are zero).
    The dict is ``config.yaml``'s settings plus ``data_shape`` (``num_classes``,
    ``in_channels``, ``image_size``), which says what input the model takes.
    """
    from granet.experiment.models import build_model

    config = read_run_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, which))
    model = build_model(config["model"], **state["data_shape"])
    model.load_state_dict(state["model"])
    return model.eval(), {**config, "data_shape": dict(state["data_shape"])}
