"""Our runner's per-iteration work as the benchmark drives it: the iteration classes `engine.fit` runs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from resnet_repro.bench.helpers import model_state_bytes, tensor_bytes
from resnet_repro.bench.variants import (
    BASE_LR,
    GAMMA,
    MILESTONES,
    MOMENTUM,
    OURS_CUDNN_BENCHMARK,
    WEIGHT_DECAY,
    Variant,
)
from resnet_repro.checkpoint import rng_state
from resnet_repro.data import DeviceData
from resnet_repro.engine import RunState
from resnet_repro.models import build_model
from resnet_repro.models.ghost_bn import use_ghost_batch_norm
from resnet_repro.optim import Schedule, make_sgd
from resnet_repro.step import (
    Accumulators,
    EagerIteration,
    GraphedIteration,
    TrainStep,
)


class OursRunner:
    """Our runner's per-iteration work, as `engine.fit` runs it minus logging: the same iteration classes."""

    def __init__(self, arch: str, depth: int, variant: Variant, data: DeviceData, batch_size: int) -> None:
        self.variant, self.batch_size, self.device = variant, batch_size, data.device
        self.data = copy.copy(data)  # shares the image tensors, own epoch-plan cache
        self.data._plans = {}
        torch.manual_seed(0)
        model = use_ghost_batch_norm(build_model(arch, depth), variant.bn_group)  # 0: plain BN, as train.py
        fmt = torch.channels_last if variant.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=fmt)
        self.optimizer = make_sgd(self.model, BASE_LR, MOMENTUM, WEIGHT_DECAY, fused=variant.sgd == "fused")
        run_model = torch.compile(self.model) if variant.compile else self.model
        self.step = TrainStep(run_model, self.optimizer, variant.precision, self.device)
        self.schedule = Schedule(BASE_LR, list(MILESTONES), GAMMA)
        self.acc = Accumulators.zeros(self.device, 0)
        self.iteration = 0
        self.iterate: EagerIteration | GraphedIteration = EagerIteration(self.step, self.data, self.acc, batch_size)
        self.one_time_note = {
            (False, False): "first steps",
            (True, False): "compile (forward + backward)",
            (True, True): "compile + graph capture",
            (False, True): "graph capture",
        }[(variant.compile, variant.graphs)]

    @property
    def capture_peak_extra(self) -> int:
        """Device bytes the graph capture needed beyond the model's state (0 without a graph)."""
        return getattr(self.iterate, "capture_peak_extra", 0)

    def cudnn_benchmark(self) -> bool:
        """train.py leaves cuDNN autotuning at torch's default."""
        return OURS_CUDNN_BENCHMARK

    def prepare(self, warmup: int) -> None:
        """Warm-up iterations (compilation happens here), then graph capture for the graph variants."""
        if self.variant.graphs:
            self.run(max(warmup - 3, 1))
            self.iterate = GraphedIteration(self.step, self.data, self.acc, self.batch_size, capture=True)
            self.run(2)
        else:
            self.run(warmup)

    def run(self, iters: int) -> None:
        """`iters` iterations of fit's loop body (no logging, evaluation or checkpoints)."""
        for _ in range(iters):
            self.iterate(self.iteration, self.schedule.lr(self.iteration))
            self.iteration += 1

    def resident_bytes(self) -> int:
        """Device bytes kept between steps: model state plus the device-resident data set."""
        d = self.data
        data_tensors = [d.x_train, d.y_train, d.x_test, d.y_test, d.x_val, d.y_val, d.normalizer.mean]
        return model_state_bytes(self.model, self.optimizer) + tensor_bytes(data_tensors)

    def checkpoint_state(self) -> dict[str, Any]:
        """What `engine.fit` puts in checkpoints/last.pt (same keys, this runner's tensors)."""
        return {
            "config_fingerprint": "0" * 64,
            "model": self.model.state_dict(),
            "optimizer": self.iterate.optimizer_state(),
            "scaler": {},
            "warmup": {},
            "rng": rng_state(self.device),
            "run_state": RunState(iteration=self.iteration).state_dict(),
            "interval": {
                "loss_sum": self.acc.loss_sum.item(),
                "wrong": self.acc.wrong.item(),
                "seen": self.acc.seen.item(),
            },
        }

    def close(self) -> None:
        """Nothing to stop."""
