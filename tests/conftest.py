from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import SmallNet

from granet.experiment import train as training
from granet.experiment.config import make_config
from granet.experiment.runs import load_checkpoint, prepare_run_dir

# The test models are tiny: one thread avoids OpenMP contention on small (and shared) machines.
torch.set_num_threads(1)


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test module's ``SETTINGS`` trained once without interruption: the run that
    interrupted and resumed runs must reproduce."""
    run_dir = prepare_run_dir(tmp_path_factory.mktemp("reference") / "run")
    training.train(make_config(request.module.SETTINGS), run_dir, progress=False)
    return run_dir


def final_checkpoints(run_dir: Path, reference: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last checkpoints of two runs, checked to stand at the same position with the same
    masks and ever-active bits."""
    a = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(reference / "checkpoints" / "last.pt")
    assert a["position"] == b["position"]
    for name, packed in b["sparsifier"]["masks"].items():
        assert torch.equal(a["sparsifier"]["masks"][name], packed), name
        assert torch.equal(
            a["sparsifier"]["ever_active"][name], b["sparsifier"]["ever_active"][name]
        )
    return a, b
