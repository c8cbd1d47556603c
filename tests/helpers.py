"""Shared test helpers: a small model, batches, a training loop, checkpoint comparison, a
trainer hook that sends a signal."""

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granet.experiment.runs import load_checkpoint
from granet.experiment.trainer import Callbacks


class SmallNet(nn.Module):
    """A conv + linear net small enough for fast tests, with a bias and a BatchNorm."""

    def __init__(self, channels: int = 6, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(model, optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        x, y = batch(i)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def masked_zero(sp, optimizer):
    """Every masked weight and every masked optimizer-state entry is exactly zero."""
    for name, p in zip(sp.names, sp.params):
        mask = sp.masks[name]
        assert not p[~mask].any(), name
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert not value[~mask].any(), name


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


class SignalAt(Callbacks):
    """Send SIGTERM to this process right after optimizer step ``step`` (a trainer hook)."""

    def __init__(self, step: int, when: bool = True) -> None:
        self.step, self.when = step, when

    def on_step(self, trainer) -> None:
        if self.when and trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Two nested states (dicts, lists, tensors, numbers) are equal, tensors bit for bit;
    the first difference is named by its path."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def one_line_error(err: str, command: str = "train") -> str:
    """The one error line a ``granet`` command printed (log lines may come before it), with
    no traceback anywhere."""
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and errors[0].startswith(f"granet {command}: error: "), err
    return errors[0]


# A page's python blocks, as docs/README say: a block runs on its own, as a reader copies it,
# unless an HTML comment on the line before it says otherwise.
CONTINUES = "<!-- continues -->"  # goes on from the page's blocks above it, run top to bottom
FRAGMENT = "<!-- fragment -->"  # uses names the text defines (your model, loader): compiled only


def doc_blocks(page: Path) -> list[tuple[str, str]]:
    """``(kind, code)`` of each python block of ``page``: ``run``, ``continues`` or
    ``fragment``."""
    blocks = []
    text = page.read_text()
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[: match.start()].rstrip().splitlines()[-1].strip()
        kind = {CONTINUES: "continues", FRAGMENT: "fragment"}.get(before, "run")
        blocks.append((kind, match.group(1)))
    return blocks


def run_doc(page: Path, fragment_names: Callable[[], dict] | None = None) -> dict:
    """Run ``page``'s blocks as a reader copies them (see :data:`CONTINUES`, :data:`FRAGMENT`):
    a block on its own in a fresh namespace; a continuing one in the namespace of every block
    above it; a fragment compiled, and run on ``fragment_names()`` (stand-ins for what it
    uses) when given. Returns the page's namespace: every name the blocks defined."""
    page_names: dict = {}
    for i, (kind, code) in enumerate(doc_blocks(page)):
        compiled = compile(code, f"{page.name} python block {i + 1}", "exec")
        if kind == "continues":
            exec(compiled, page_names)
            continue
        if kind == "fragment" and fragment_names is None:
            continue
        names = {**page_names, **fragment_names()} if kind == "fragment" else {}
        exec(compiled, names)
        page_names.update(names)
    return page_names
