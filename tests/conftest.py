import os
import urllib.error
import urllib.request
from pathlib import Path

import hypothesis
import pytest
import torch
from helpers import SmallNet

from granet.experiment import train as training
from granet.experiment.config import make_config
from granet.experiment.datasets import files

# The test models are tiny: one thread avoids OpenMP contention on small (and shared) machines.
torch.set_num_threads(1)

# The same examples on every run: a property test finds new cases when it is edited, never at
# random in CI (GRANET_HYPOTHESIS=explore draws fresh ones).
hypothesis.settings.register_profile("fixed", derandomize=True, database=None)
hypothesis.settings.register_profile("explore")
hypothesis.settings.load_profile(os.environ.get("GRANET_HYPOTHESIS", "fixed"))


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test module's ``SETTINGS`` trained once without interruption: the run that
    interrupted and resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    training.train(make_config(request.module.SETTINGS), run_dir, progress=False)
    return run_dir


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No dataset anywhere: empty $GRANET_DATA and cache, no system folders, no network."""
    monkeypatch.setenv("GRANET_DATA", str(tmp_path / "granet-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "SYSTEM_DATA_DIRS", ())

    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path / "granet-data"
