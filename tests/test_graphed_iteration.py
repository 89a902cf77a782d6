"""The CUDA-graph iteration's logic, checked on CPU: its body (static index buffers, the rate as a device tensor
read by fused SGD, device-side sums) equals the eager iteration bit for bit, inside `fit` too, and a run that uses
it resumes exactly. Only the capture itself needs a GPU (tests/test_fast_step.py, marked `gpu`)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
from reliability_support import make_tiny_npz, state_digest

from resnet_repro.bench.measure import random_cifar
from resnet_repro.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainerConfig
from resnet_repro.data import DeviceData, load_npz
from resnet_repro.engine import TrainingRun, fit
from resnet_repro.models import build_model
from resnet_repro.optim import Schedule, make_sgd
from resnet_repro.step import (
    GRAPH_WARMUP_STEPS,
    Accumulators,
    EagerIteration,
    GraphedIteration,
    TrainStep,
    make_iteration,
)

CPU = torch.device("cpu")


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet", 8)
    optimizer = make_sgd(model, 0.1, 0.9, 1e-4, fused=True)
    step = TrainStep(model, optimizer, "fp32", CPU)
    return model, optimizer, step, Accumulators.zeros(CPU, 0)


def test_graphed_body_equals_the_eager_iteration_bit_for_bit() -> None:
    data = DeviceData(random_cifar(80, 8, seed=1), None, CPU, "pixel_mean", True, seed=2)
    (m_eager, _, s_eager, a_eager), (m_graph, o_graph, s_graph, a_graph) = _training(), _training()
    eager = EagerIteration(s_eager, data, a_eager, 16)
    graphed = GraphedIteration(s_graph, data, a_graph, 16, capture=False)
    schedule = Schedule(0.1, [3, 5], 0.1)
    for it in range(7):  # crosses both milestones and an epoch boundary (80 images = 5 batches)
        w_eager, w_graph = eager(it, schedule.lr(it)), graphed(it, schedule.lr(it))
        assert torch.equal(w_eager, w_graph), it
    for (name, a), b in zip(m_eager.state_dict().items(), m_graph.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(a_eager.tensors(), a_graph.tensors(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(o_graph.param_groups[0]["lr"], torch.Tensor)
    assert float(o_graph.param_groups[0]["lr"]) == pytest.approx(0.001)
    assert graphed.optimizer_state()["param_groups"][0]["lr"] == eager.optimizer_state()["param_groups"][0]["lr"]
    assert isinstance(o_graph.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor


def test_graphed_iteration_refuses_an_optimizer_without_the_device_side_guard() -> None:
    torch.manual_seed(0)
    model = build_model("resnet", 8)
    step = TrainStep(model, make_sgd(model, 0.1, 0.9, 1e-4, fused=False), "fp32", CPU)
    data = DeviceData(random_cifar(32, 8), None, CPU, "pixel_mean", True, seed=0)
    with pytest.raises(ValueError, match="fused SGD"):
        GraphedIteration(step, data, Accumulators.zeros(CPU, 0), 16, capture=False)


class _NoOpStream:
    def wait_stream(self, other: object) -> None:
        pass


def _capture_fails_after_its_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda as a capture sees it, on the CPU: streams and synchronisation do nothing, and the capture itself
    raises (as CUDA does for an op that is not allowed while a stream captures)."""

    def graph(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    for name, fake in {
        "Stream": lambda device=None: _NoOpStream(),
        "current_stream": lambda device=None: _NoOpStream(),
        "stream": lambda stream: contextlib.nullcontext(),
        "synchronize": lambda device=None: None,
        "memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "CUDAGraph": object,
        "graph": graph,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)


def test_a_failed_capture_trains_eagerly_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The fallback is decided where the iteration is built: a warning, then the eager iteration; the capture's
    warm-up steps (which trained) are undone, so the run equals an eager run bit for bit."""
    _capture_fails_after_its_warm_up(monkeypatch)
    data = DeviceData(random_cifar(80, 8, seed=1), None, CPU, "pixel_mean", True, seed=2)
    (m_eager, _, s_eager, a_eager), (m_fell, _, s_fell, a_fell) = _training(), _training()
    steps_taken = []
    real_call = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, *a: steps_taken.append(1) or real_call(self, *a))
    with caplog.at_level(logging.WARNING, logger="resnet_repro.step"):
        fell_back = make_iteration(s_fell, data, a_fell, 16, graphs=True, capture=True)
    assert isinstance(fell_back, EagerIteration) and len(steps_taken) == GRAPH_WARMUP_STEPS
    assert "CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted" in caplog.text
    assert "training with the eager iteration instead" in caplog.text
    eager = make_iteration(s_eager, data, a_eager, 16, graphs=False, capture=True)
    schedule = Schedule(0.1, [3, 5], 0.1)
    for it in range(7):
        assert torch.equal(eager(it, schedule.lr(it)), fell_back(it, schedule.lr(it))), it
    for (name, a), b in zip(m_eager.state_dict().items(), m_fell.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(a_eager.tensors(), a_fell.tensors(), strict=True):
        assert torch.equal(a, b)
    assert fell_back.optimizer_state()["param_groups"] == eager.optimizer_state()["param_groups"]


def test_without_capture_the_graphed_iteration_is_kept() -> None:
    data = DeviceData(random_cifar(32, 8), None, CPU, "pixel_mean", True, seed=0)
    _, _, step, acc = _training()
    assert isinstance(make_iteration(step, data, acc, 16, graphs=True, capture=False), GraphedIteration)
    with pytest.raises(ValueError, match="one process"):
        make_iteration(step, data, acc, 16, graphs=True, capture=False, rank=0, world_size=2)


def _fit(run_dir: Path, npz: Path, cuda_graphs: bool, max_iter: int) -> str:
    arrays = load_npz(npz)
    data = DeviceData(arrays, None, CPU, "pixel_mean", True, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet", 8)
    optimizer = make_sgd(model, 0.1, 0.9, 1e-4, fused=True)
    cfg = TrainConfig(
        model=ModelConfig(depth=8),
        data=DataConfig(batch_size=16, eval_batch_size=500),
        optim=OptimConfig(max_iter=max_iter),
        trainer=TrainerConfig(log_every=4, eval_every=6, checkpoint_every=6, progress=False, cuda_graphs=cuda_graphs),
        responses=False,
    )
    run = TrainingRun(model, optimizer, Schedule(0.1, [8, 10], 0.1), data, run_dir, cfg, "fp32", "f" * 64, {})
    fit(run, {"arch": "resnet"})
    return state_digest(run_dir / "checkpoints" / "last.pt")


def test_fit_with_the_graphed_iteration_equals_eager_fit_and_resumes_exactly(sample_npz: Path, tmp_path: Path) -> None:
    npz = make_tiny_npz(sample_npz, tmp_path / "small.npz", n_train=160, n_test=100)
    eager = _fit(tmp_path / "eager", npz, cuda_graphs=False, max_iter=12)
    graphed = _fit(tmp_path / "graphed", npz, cuda_graphs=True, max_iter=12)
    assert graphed == eager
    _fit(tmp_path / "resumed", npz, cuda_graphs=True, max_iter=6)  # stops with a checkpoint at 6
    assert _fit(tmp_path / "resumed", npz, cuda_graphs=True, max_iter=12) == eager
    assert _fit(tmp_path / "other", npz, cuda_graphs=True, max_iter=10) != eager  # the digest tells runs apart
