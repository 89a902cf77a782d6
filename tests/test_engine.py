"""The runner end to end on real images: run-directory contract, real learning, DDP equivalence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO
from omegaconf import OmegaConf
from reliability_support import cli_env, leave_together, make_tiny_npz

from resnet_repro.config import TrainConfig
from resnet_repro.engine import DistInfo
from resnet_repro.train import train

METRICS_KEYS = {
    "status", "arch", "depth", "shortcut", "seed", "experiment", "data", "iterations", "max_iter", "final_test_err",
    "final_test_loss", "final_train_err", "final_train_loss", "final_val_err", "best_val_err", "best_val_iter",
    "params", "wall_time_s", "ms_per_iter", "device", "versions", "layer_response_std", "config", "date",
}
EVENT_TAGS = {"train/err", "train/loss", "test/err", "test/loss", "val/err", "opt/lr", "perf/img_per_s"}


def tiny_config(sample_npz: Path, **overrides) -> TrainConfig:
    """A small, fast run on the real CIFAR-10 sample; overrides are dotted keys."""
    cfg = OmegaConf.structured(TrainConfig)
    base = {
        "data.source": "npz", "data.path": str(sample_npz), "data.batch_size": 32, "data.eval_batch_size": 512,
        "model.depth": 8, "optim.max_iter": 12, "optim.milestones": [6, 9], "trainer.log_every": 4,
        "trainer.eval_every": 6, "trainer.checkpoint_every": 6, "trainer.progress": False, "trainer.device": "cpu",
    }
    for key, value in {**base, **overrides}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_object(cfg)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_short_run_writes_the_documented_run_directory(sample_npz, tmp_path):
    cfg = tiny_config(sample_npz, **{"data.val_split": 500})
    metrics = train(cfg, tmp_path, DistInfo())
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk) >= METRICS_KEYS and on_disk["iterations"] == 12 and on_disk["status"] == "finished"
    assert on_disk["final_test_err"] == pytest.approx(metrics["final_test_err"])
    assert on_disk["config"]["model"]["depth"] == 8 and on_disk["data"]["n_val"] == 500
    assert len(on_disk["layer_response_std"]) == 7  # 6n+1 3x3 layers for depth 8
    scalars = read_scalars(tmp_path)
    assert set(scalars) >= EVENT_TAGS
    assert [s for s, _ in scalars["train/err"]] == [4, 8, 12]
    assert [s for s, _ in scalars["test/err"]] == [6, 12]
    assert scalars["test/err"][-1][1] == pytest.approx(on_disk["final_test_err"])
    assert [v for _, v in scalars["opt/lr"]] == pytest.approx([0.1, 0.01, 0.001])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["run_state"]["iteration"] == 12 and "model" in state and "optimizer" in state
    assert on_disk["best_val_iter"] in (6, 12)  # chosen on the validation split, never the test set


def test_real_learning_on_real_images(sample_npz, tmp_path):
    """ResNet-8 on the CIFAR-10 sample, 150 iterations of batch 64: test error far below the 90% of chance."""
    cfg = tiny_config(sample_npz, **{
        "data.batch_size": 64, "optim.max_iter": 150, "optim.milestones": [100, 130], "trainer.log_every": 50,
        "trainer.eval_every": 150, "trainer.checkpoint_every": 150, "responses": False,
    })
    metrics = train(cfg, tmp_path, DistInfo())
    assert metrics["final_test_err"] < 70.0, metrics["final_test_err"]
    assert metrics["final_train_loss"] < 1.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg: TrainConfig, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metrics = train(cfg, Path(run_dir), DistInfo(rank=rank, world_size=world_size))
        Path(f"{run_dir}.rank{rank}.json").write_text(json.dumps(metrics))
        leave_together()
    finally:
        torch.distributed.destroy_process_group()


def _final_parameters(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if not k.endswith(buffers)])


def test_two_process_ddp_matches_one_process_with_ghost_bn(sample_npz, tmp_path):
    """2 gloo ranks x 16 images == 1 process x 32 images with BN statistics over groups of 16.

    fp32 reductions run in a different order, so equality is up to rounding (relative 1e-4 after 8 steps); the
    same single-process run with BN over all 32 images is the negative control and lies much further away. The
    logged training loss and error cover the whole global batch (both ranks' images), as the single process's do;
    only rank 0 evaluates, and its errors are the ones metrics.json reports.
    """
    common = {"optim.max_iter": 8, "optim.milestones": [4, 6], "trainer.checkpoint_every": 8}
    one = train(tiny_config(sample_npz, **common, **{"model.bn_group": 16}), tmp_path / "ghost", DistInfo())
    train(tiny_config(sample_npz, **common), tmp_path / "whole", DistInfo())
    ddp = tiny_config(sample_npz, **common)
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp, str(tmp_path / "ddp")), nprocs=2, join=True)
    ghost, whole, two = (_final_parameters(tmp_path / d) for d in ("ghost", "whole", "ddp"))
    start = torch.load(tmp_path / "ghost" / "checkpoints" / "last.pt", weights_only=True)
    moved = (ghost - two).norm() / ghost.norm()
    control = (whole - two).norm() / ghost.norm()
    assert moved < 1e-4, moved
    assert control > 10 * moved, (control, moved)
    assert start["run_state"]["iteration"] == 8
    written = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert written["world_size"] == 2
    assert not list((tmp_path / "ddp").glob("rank*"))  # only rank 0 writes
    rank0, rank1 = (json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1))
    for ranks_metrics in (rank0, rank1, written):  # 4 iterations x 32 images since the last log point
        assert ranks_metrics["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
        assert abs(ranks_metrics["final_train_err"] - one["final_train_err"]) <= 100 / 128  # one image at most
    assert written["final_test_err"] == rank0["final_test_err"] is not None
    assert written["layer_response_std"] == rank0["layer_response_std"] is not None
    assert rank1["final_test_err"] is None and rank1["layer_response_std"] is None  # one evaluation: rank 0's


def test_torchrun_prints_each_line_once(sample_npz, tmp_path):
    """The real command under torchrun, 2 CPU ranks (gloo): one console (rank 0's), one finished line, one result."""
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz", n_train=64, n_test=40)
    args = [
        "data=npz", f"data.path={npz}", "data.batch_size=16", "model.depth=8", "optim.max_iter=4",
        "optim.milestones=[2,3]", "trainer.log_every=2", "trainer.eval_every=4", "trainer.checkpoint_every=4",
        "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false", f"runs_dir={tmp_path / 'runs'}",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "resnet_repro.train", *args]
    done = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in ("iter 2/4 lr", "iter 4/4 lr", "iter 4 test err", "finished: test err"):
        assert output.count(line) == 1, (line, output)
    (metrics,) = (tmp_path / "runs").rglob("metrics.json")
    assert json.loads(metrics.read_text())["world_size"] == 2
