"""Fabricate run directories exactly as train.py writes them (the run-directory contract:
file names in resnet_repro/run_dir.py).

Used by the results/plot tests, and usable to diff a fabricated directory against a real run's.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

Curves = dict[str, tuple[list[int], list[float]]]
SAMPLE_DATA = {
    "name": "npz",
    "path": "data/cifar10_sample.npz",
    "label": "CIFAR-10 sample (5,085 train / 1,017 test)",
    "n_train": 5085,
    "n_val": 0,
    "n_test": 1017,
}


def cifar_params(depth: int, shortcut: str = "A") -> int:
    """Exact parameter count of the CIFAR plain/ResNet of this depth (the counts
    tests/test_models.py pins)."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16 + 64 * 10 + 10  # stem conv + BN, FC
    for stage, (c_in, c_out) in enumerate(((16, 16), (16, 32), (32, 64))):
        total += 9 * (c_in * c_out + (2 * n - 1) * c_out * c_out) + 2 * n * 2 * c_out  # convs + BNs
        projections = {"A": 0, "B": int(stage > 0), "C": n}[shortcut]
        if projections:
            total += c_in * c_out + 2 * c_out + (projections - 1) * (c_out * c_out + 2 * c_out)
    return total


def default_curves(final_train_err: float, final_test_err: float, max_iter: int, seed: int) -> Curves:
    """Plausible decaying error curves ending exactly at the given final errors (train logged 40×, test 20×)."""
    rng = np.random.default_rng(seed)
    curves: Curves = {}
    for tag, final, points in (("train/err", final_train_err, 40), ("test/err", final_test_err, 20)):
        steps = np.linspace(max_iter / points, max_iter, points).astype(int).tolist()
        decay = np.exp(-8 * np.linspace(0, 1, points)) * (80 - final) + final + rng.uniform(0, 1, points)
        decay[-1] = final
        curves[tag] = steps, decay.round(4).tolist()
    for tag in ("train/loss", "test/loss"):
        steps, errs = curves[tag.replace("loss", "err")]
        curves[tag] = steps, [round(e / 40, 4) for e in errs]
    steps = curves["train/err"][0]
    curves["opt/lr"] = steps, [0.1] * len(steps)
    curves["perf/img_per_s"] = steps, [20000.0] * len(steps)
    return curves


def default_layer_response_std(arch: str, depth: int, seed: int) -> list[float] | None:
    """A Figure 7 statistic per 3×3 layer (depth - 1 of them): plain nets above ResNets, deeper ResNets smaller."""
    if arch not in ("plain", "resnet"):
        return None
    rng = np.random.default_rng([seed, depth])
    scale = 2.0 if arch == "plain" else (20 / depth) ** 0.3
    return (scale * rng.uniform(0.5, 1.0, depth - 1)).round(4).tolist()


def write_events(run_dir: Path, curves: Curves) -> None:
    """Write the curves as TensorBoard scalars with global_step = iteration."""
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, (steps, values) in curves.items():
        for step, value in zip(steps, values):
            writer.add_scalar(tag, value, global_step=step)
    writer.close()


def run_dir_name(arch: str, depth: int, shortcut: str, seed: int) -> str:
    """Hydra's override_dirname for a sweep over arch, depth, shortcut and seed."""
    return f"model.depth={depth},model.shortcut={shortcut},model={arch},seed={seed}"


def make_run_dir(
    root: str | Path,
    arch: str,
    depth: int,
    shortcut: str = "A",
    seed: int = 0,
    final_test_err: float = 10.0,
    curves: Curves | None = None,
    layer_response_std: list[float] | None = None,
    **overrides: Any,
) -> Path:
    """A finished run directory: metrics.json (overrides merged in, dicts key by key) and a real event file."""
    run_dir = Path(root) / run_dir_name(arch, depth, shortcut, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    max_iter = overrides.get("max_iter", 400)
    final_train_err = overrides.get("final_train_err", final_test_err - 2.0)
    curves = curves or default_curves(final_train_err, final_test_err, max_iter, seed)
    metrics: dict[str, Any] = {
        "status": "finished",
        "arch": arch,
        "depth": depth,
        "shortcut": shortcut,
        "seed": seed,
        "experiment": "fig6",
        "data": dict(SAMPLE_DATA),
        "iterations": max_iter,
        "max_iter": max_iter,
        "final_test_err": final_test_err,
        "final_test_loss": final_test_err / 40,
        "final_train_err": final_train_err,
        "final_train_loss": final_train_err / 40,
        "final_val_err": None,
        "best_val_err": None,
        "best_val_iter": None,
        "params": cifar_params(depth, shortcut),
        "wall_time_s": 12.5,
        "ms_per_iter": 31.25,
        "device": "NVIDIA H100 80GB HBM3",
        "versions": {"torch": "2.4.0", "cuda": "12.4", "cudnn": 90100, "python": "3.11.9", "git_sha": "0123abc"},
        "layer_response_std": layer_response_std or default_layer_response_std(arch, depth, seed),
        "precision": "bf16",
        "world_size": 1,
        "config": {"model": {"arch": arch, "depth": depth, "shortcut": shortcut, "bn_group": 0}, "seed": seed,
                   "data": {"batch_size": 128}},
        "date": datetime(2025, 1, 1, 12, seed, tzinfo=timezone.utc).isoformat(),
    }
    for key, value in overrides.items():
        metrics[key] = {**metrics[key], **value} if isinstance(metrics.get(key), dict) else value
    write_events(run_dir, curves)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir


def make_failed_run_dir(root: str | Path, arch: str, depth: int, shortcut: str = "A", seed: int = 0,
                        error: str = "loss is NaN (diverged)", iteration: int | None = 120) -> Path:
    """A run that diverged: failed.json plus the curves logged before it stopped, and no metrics.json."""
    run_dir = Path(root) / run_dir_name(arch, depth, shortcut, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_events(run_dir, {"train/err": ([50, 100], [88.0, 90.0])})
    failure = {"status": "failed", "error": error, "iteration": iteration,
               "date": datetime(2025, 1, 1, 13, tzinfo=timezone.utc).isoformat()}
    (run_dir / "failed.json").write_text(json.dumps(failure, indent=2))
    return run_dir
