"""Reading a run's records back, checked: its settings (``config.yaml``), its epochs
(``metrics.jsonl``, also appended to here), its report (``report.json``) and its trained
model."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from granet.experiment.checkpoints import checkpoint_path, load_checkpoint
from granet.experiment.files import open_append, to_json, write_atomic
from granet.experiment.folder import (
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_JSON,
    is_run_dir,
    with_added,
)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was trained with (its ``config.yaml``; those of
    :data:`SETTINGS_ADDED` that an older granet did not write, at the value it trained with)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        if is_run_dir(run_dir):
            raise FileNotFoundError(
                f"{run_dir} has no {CONFIG_FILE}: the run was stopped during its start-up, "
                "before it had settings; start it again with --overwrite"
            )
        raise FileNotFoundError(f"{run_dir} is not a granet run folder: no {CONFIG_FILE}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return with_added(values)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty before the first epoch ends). A last
    line cut short (the writer was killed mid-line) is dropped with a warning; a bad line
    elsewhere is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [(i, ln) for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as e:  # a complete line is always valid JSON: one cut short is not
            if n == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped its last line, cut short (the run was stopped while "
                    "writing it)",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}, line {i}: {e}") from None
        wrong = wrong_fields(record, METRICS_FIELDS, required=("epoch",))
        if wrong:
            raise ValueError(f"{path}, line {i}: not an epoch record ({wrong})")
        records.append(record)
    return records


def append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Add one epoch's record to ``metrics.jsonl`` as one line."""
    path = run_dir / METRICS_FILE
    with open_append(path) as f:
        try:
            f.write(to_json(record) + "\n")
            f.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot write it: {e.strerror}", str(path)) from None


def truncate_metrics(run_dir: Path, epochs_done: int) -> None:
    """Keep the metrics of the epochs a checkpoint includes (a kill between the metrics line
    and the checkpoint, or mid-line, leaves more)."""
    if (run_dir / METRICS_FILE).is_file():
        kept = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs_done]
        write_atomic(run_dir / METRICS_FILE, "".join(to_json(r) + "\n" for r in kept))


REPORT_KEYS = ("method", "model", "dataset", "seed", "test_accuracy", "sparsity", "flops")
_NUMBER, _MAYBE = (int, float), (int, float, type(None))
# the fields that granet report and the comparison read back (dotted: nested), and their types
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("method", "model", "dataset"), (str,)),
    "seed": (int,),
    **dict.fromkeys(("test_accuracy", "sparsity", "target_sparsity", "train_seconds"), _NUMBER),
    "itop_rate": _MAYBE,
    "flops": (dict,),
    "flops.inference_per_sample.ratio": _NUMBER,
    "flops.training_total.ratio": _NUMBER,
    "target_reached": (bool,),
    "config": (dict,),
}
# a metrics.jsonl record's fields and their types
METRICS_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("epoch", "step", "samples"), (int,)),
    **dict.fromkeys(("train_loss", "train_accuracy", "sparsity", "lr", "seconds"), _NUMBER),
    **dict.fromkeys(("val_loss", "val_accuracy", "itop_rate", "regrow_fraction"), _MAYBE),
    "best": (bool,),
    "layer_density": (dict,),
}


_KIND_NAMES = {
    int: "an integer",
    float: "a float",
    str: "a string",
    bool: "true or false",
    dict: "an object",
    type(None): "null",
}


def wrong_fields(
    record: Any, fields: Mapping[str, tuple[type, ...]], required: Collection[str] = ()
) -> str | None:
    """What is wrong with the fields of ``record`` (a JSON object read back), or ``None``: a
    ``required`` one missing, or one of another type than ``fields`` gives (a bool is no
    number)."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    for name, kinds in fields.items():
        value: Any = record
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                if name in required:
                    return f"no {name}"
                break
            value = value[part]
        else:
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                kind = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
                return (
                    f"{name} is {value!r}, not {kind.replace('an integer or a float', 'a number')}"
                )
    return None


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {REPORT_JSON}: the run has not finished")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path} is not a granet report (no {', '.join(missing)})")
    required = [k for k in REPORT_FIELDS if k not in ("target_reached", "config")]
    wrong = wrong_fields(report, REPORT_FIELDS, required)
    if wrong:
        raise ValueError(f"{path} is not a granet report ({wrong})")
    return report


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run (in eval mode, on the CPU) and its settings.

    The architecture is the one named in ``config.yaml``, built for the data shape recorded in
    the checkpoint; the weights are those of the ``which`` checkpoint (masked weights are zero).
    The dict is ``config.yaml``'s settings plus ``data_shape`` (``num_classes``,
    ``in_channels``, ``image_size``), which says what input the model takes.
    """
    from granet.experiment.models import build_model

    config = read_run_config(run_dir)
    path = checkpoint_path(run_dir, which)
    state = load_checkpoint(path)
    try:
        model = build_model(config["model"], **state["data_shape"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path} does not hold a model for {run_dir / CONFIG_FILE}: {e}") from None
    return model.eval(), {**config, "data_shape": dict(state["data_shape"])}
