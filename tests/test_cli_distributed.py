"""``granet train`` with two CPU processes (gloo): the run one process trains, process 0 alone
writes, a signal that reaches one process stops both at the same step, and ``--resume`` works
on another number of processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import SignalAt, final_checkpoints

from granet.cli import main
from granet.experiment import parallel
from granet.experiment.config import make_config
from granet.experiment.runs import load_checkpoint, read_metrics, read_report
from granet.experiment.signals import Interrupted
from granet.experiment.train import train
from granet.experiment.trainer import check_shares, eval_loader

# Topology updates every step (automatic cadence on a 27-step run): many rounds to agree on.
SETTINGS = {
    "dataset": "synthetic",
    "model": "lenet5",
    "epochs": 3,
    "batch_size": 100,
    "device": "cpu",
}
STEPS_PER_EPOCH = 9  # 900 training examples / 100
WEIGHT_ATOL = 1e-5  # measured gaps between 1- and 2-process runs: about 1e-8


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same masks and position, weights equal up to float summation order, same epochs."""
    a, b = final_checkpoints(run_dir, reference)
    for name, tensor in b["model"].items():
        assert torch.allclose(a["model"][name].float(), tensor.float(), rtol=0, atol=WEIGHT_ATOL)
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert len(got) == len(want) == SETTINGS["epochs"]
    for g, w in zip(got, want):
        assert (g["samples"], g["sparsity"], g["itop_rate"]) == (
            w["samples"],
            w["sparsity"],
            w["itop_rate"],
        )
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, run_dir: Path, signalled: int, at_step: int) -> None:
    """One of two processes, as torchrun would start it; ``signalled`` alone gets SIGTERM."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    kill = SignalAt(at_step, when=rank == signalled)
    with parallel.process_group("cpu"):
        try:
            train(make_config(SETTINGS), run_dir, progress=False, callbacks=[kill])
        except Interrupted as stopped:
            (run_dir / f"stopped-{rank}").write_text(str(stopped.step))


def test_a_signal_to_one_process_stops_both_then_resume_on_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    mp.spawn(worker, args=(free_port(), run_dir, 1, 2 * STEPS_PER_EPOCH + 1), nprocs=2)
    # the shared decision comes at the next multiple of 10 steps: step 20, mid-epoch 3
    assert [(run_dir / f"stopped-{r}").read_text() for r in range(2)] == ["20", "20"]
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["position"] == {"epoch": 2, "batch": 2, "step": 20}
    assert saved["sums"]["seen"] == 200  # both processes' examples, counted once
    assert len(read_metrics(run_dir)) == 2  # process 0 alone wrote the metrics

    train(make_config(SETTINGS), run_dir, resume=True, progress=False)
    assert_same_run(run_dir, reference)


def test_torchrun_resumes_a_one_process_run_on_two(reference, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(
            make_config(SETTINGS),
            run_dir,
            progress=False,
            callbacks=[SignalAt(STEPS_PER_EPOCH + 4)],
        )

    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", "-m", "granet", "train", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("## Layers") == 1  # one report, printed by process 0
    assert done.stderr.count("resuming") == 1
    report = read_report(run_dir)
    assert report["environment"]["processes"] == 2
    assert report["environment"]["hardware"].startswith("2 processes x ")
    assert_same_run(run_dir, reference)


def test_every_process_needs_a_share_of_every_batch():
    check_shares(examples=900, batch_size=100, processes=8)
    with pytest.raises(ValueError, match="leaves a batch of 1 example"):
        check_shares(examples=901, batch_size=100, processes=2)
    with pytest.raises(ValueError, match="batch_size 2 .* 4 processes"):
        check_shares(examples=900, batch_size=2, processes=4)


def test_shares_partition_the_batches_and_the_evaluation_set():
    batches = [list(range(0, 7)), list(range(7, 10))]
    shares = [parallel.shard(batches, parallel.Ranks(r, 3)) for r in range(3)]
    for i, batch in enumerate(batches):
        parts = [s[i] for s in shares]
        assert sorted(sum(parts, [])) == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    config = make_config({**SETTINGS, "batch_size": 4})
    seen = [
        i
        for r in range(3)
        for b in eval_loader(range(10), config, torch.device("cpu"), parallel.Ranks(r, 3))
        for i in b.tolist()
    ]
    assert sorted(seen) == list(range(10))


def test_only_train_runs_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "nowhere.yaml"]) == 2
    assert "only granet train runs under torchrun" in capsys.readouterr().err
