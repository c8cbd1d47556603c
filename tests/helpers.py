"""Shared test helpers: a small model, batches, a training loop, checkpoint comparison, a
trainer hook that sends a signal, the CLI run in this process or as a child process."""

import contextlib
import copy
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granet.cli import main
from granet.experiment.checkpoints import load_checkpoint
from granet.experiment.trainer import Callbacks

SRC = Path(__file__).resolve().parents[1] / "src"


def src_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with this checkout's ``src`` first on
    PYTHONPATH, so that a child process imports the granet under test."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return env


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``granet *argv`` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def granet_process(*argv: str, **popen: Any) -> subprocess.Popen:
    """``python -m granet *argv`` as a child process on one thread, its output piped as text;
    ``popen`` overrides those Popen arguments."""
    settings = {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        "env": src_env(OMP_NUM_THREADS="1"),
        **popen,
    }
    return subprocess.Popen([sys.executable, "-m", "granet", *argv], **settings)


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


def rounding_tol(dtype: torch.dtype, terms: int, magnitude: Any = 1.0) -> Any:
    """How far apart two float results of the same sum may be when it runs in different orders
    (sparse vs dense kernels, one vs several processes, another CPU or thread count).

    A float sum of ``terms`` terms whose absolute values add up to ``magnitude`` is within
    ``(terms - 1) * u * magnitude`` of the exact sum, u = eps / 2, whatever the order (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., (4.4)); two orders are within twice
    that. ``magnitude`` may be a tensor: one bound per entry.
    """
    return max(terms - 1, 1) * torch.finfo(dtype).eps * magnitude


def optimizer_gain(optimizer: torch.optim.Optimizer) -> float:
    """The most one optimizer step multiplies a gradient's error by on its way into the weights
    and the optimizer state (to first order): SGD's momentum buffer sums a geometric series,
    ``1 / (1 - momentum)``, ``lr`` times that reaches the weights; Adam and RMSprop divide by
    ``sqrt(v) + eps``, whose slope in ``g`` near zero is up to ``lr / eps``."""
    gain = 1.0
    for group in optimizer.param_groups:
        series = 1 / (1 - (group.get("momentum") or 0.0))
        step = group["lr"] / group["eps"] if "eps" in group else group["lr"]
        gain = max(gain, series, step * series)
    return gain


def sum_magnitude(model: nn.Module, x: torch.Tensor, backward: bool = True) -> tuple[int, float]:
    """``(terms, magnitude)`` for :func:`rounding_tol` covering one forward pass of ``model`` on
    ``x`` (and its backward pass unless ``backward=False``), for a network of Linear and Conv
    layers with 1-Lipschitz activations (ReLU, max pooling) in between.

    Run on ``|x|`` with every parameter replaced by its absolute value, each layer's output bounds
    the absolute terms of that layer's sums and of the errors earlier layers pass on through it,
    so the output error is at most ``depth * (n - 1) * u * magnitude``, ``n`` the longest sum
    (fan-in, fan-out or the batch a weight gradient sums over), ``magnitude`` the largest
    output entry of the absolute network. The backward pass runs as many sums, of the same
    lengths.
    """
    absolute = copy.deepcopy(model)
    longest, depth, magnitude = x.shape[0], 0, 0.0

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal longest, depth, magnitude
        longest = max(longest, module.weight[0].numel() + 1, module.weight.shape[0])
        depth += 1
        magnitude = max(magnitude, float(out.max()))

    handles = [
        m.register_forward_hook(hook)
        for m in absolute.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        out = absolute(x.abs())
    for handle in handles:
        handle.remove()
    magnitude = max(magnitude, float(out.abs().max()))
    passes = 2 if backward else 1
    return passes * max(depth, 1) * (longest - 1) + 1, magnitude


VOCAB = 64  # the tiny transformers' vocabulary


def tiny_llama() -> nn.Module:
    """A two-layer Llama-style causal LM (grouped-query attention) from a config, seeded: CPU, no
    downloads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    """A two-layer GPT-2 causal LM (its Conv1D layers store weights transposed) from a config,
    seeded: CPU, no downloads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32)
    )


def snapshot(net: nn.Module, sp: Any) -> dict[str, Any]:
    """Copies of a sparsifier's masks and step and of the model's state, to compare runs."""
    return {
        "masks": {n: m.clone() for n, m in sp.masks.items()},
        "weights": {n: p.detach().clone() for n, p in net.state_dict().items()},
        "step": sp.step,
    }


class Tokens(torch.utils.data.Dataset):
    """``n`` random token sequences of ``length`` (from a generator seeded with ``seed``), each
    its own label: a causal LM's data set (the model shifts the labels)."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def join_gloo(rank: int, world: int, store: Path, seconds: int = 60) -> None:
    """Join a CPU process group of ``world`` spawned test processes through the file ``store``
    (one torch thread each: the test machines are small and shared)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=seconds),
    )


def hf_gpt2() -> Any:
    """A two-block GPT-2 language model for the Hugging Face Trainer tests, without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)
