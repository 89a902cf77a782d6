"""The rows `make bench` times, as data (the typical reproduction, then our runner with its speed settings), and
what each runs: the typical reproduction's training loop, or our runner's own iteration (resnet_repro/step.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from resnet_repro.config import OptimConfig
from resnet_repro.data import DeviceData, ImageArrays
from resnet_repro.device import cpu_has_native_bf16
from resnet_repro.models import build_model
from resnet_repro.models.ghost_bn import use_ghost_batch_norm
from resnet_repro.optim import Schedule, make_sgd
from resnet_repro.step import Accumulators, GraphedIteration, TrainStep, make_iteration

RECIPE = OptimConfig()  # the paper's SGD: lr, momentum, weight decay, milestones, 64k iterations
# The usual public reproductions normalise with these CIFAR-10 channel statistics (the cost is what matters here).
BASELINE_MEAN, BASELINE_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Row:
    """One timed configuration; `where` it runs: cpu, cuda or both."""

    key: str
    label: str
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    sgd: str = "fused"  # fused | foreach | default (torch.optim.SGD without flags, the baseline's)
    compile: bool = False  # torch.compile the model
    graphs: bool = False  # step.GraphedIteration: the whole iteration in one CUDA graph
    bn_group: int = 0  # ghost BN over this many images (model.bn_group); 64 = the paper's BN statistics
    where: str = "both"


BF16 = {"precision": "bf16", "channels_last": True}
# torch.compile rows are CUDA only: on a 2-core Zen 1 it gained 1-3 % over (1cl) after 29-94 s of compiling
# (results/bench/bench-cpu-speed-settings.md, rows 1c and 1clc, since removed).
ROWS = (
    Row("baseline", "baseline: PIL DataLoader, fp32 eager, SGD(default flags), loss.item() every step", sgd="default"),
    Row("ours-1", "(1) device data + batched aug, fp32, foreach SGD", sgd="foreach"),
    Row("ours-2", "(2) + bf16 autocast + channels_last", sgd="foreach", **BF16),
    Row("ours-3", "(3) + fused SGD (guard on device: no host sync)", **BF16),
    Row("ours-4", "(4) + torch.compile", compile=True, where="cuda", **BF16),
    Row("ours-5", "(5) + CUDA graph (aug+fwd+bwd+SGD)", compile=True, graphs=True, where="cuda", **BF16),
    Row("ours-5b", "(5b) (3) + CUDA graph, no compile", graphs=True, where="cuda", **BF16),
    Row("ours-3g", "(3g) (3) with the paper's BN over 64 images (ghost BN)", bn_group=64, **BF16),
    Row("ours-5bg", "(5bg) (5b) with the paper's BN over 64 images", graphs=True, bn_group=64, where="cuda", **BF16),
    Row("ours-1cl", "(1cl) (1) + channels_last", channels_last=True, sgd="foreach", where="cpu"),
)
BY_KEY = {row.key: row for row in ROWS}


def select(keys: str | None) -> list[Row]:
    """The rows named by --configs (a comma list; all when None), in table order."""
    wanted = set(filter(None, keys.split(","))) if keys else set(BY_KEY)
    if wanted - set(BY_KEY):
        raise SystemExit(f"--configs: unknown {sorted(wanted - set(BY_KEY))}; valid: {list(BY_KEY)}")
    return [row for row in ROWS if row.key in wanted]


def skip_reason(row: Row, device: torch.device, batch_size: int) -> str | None:
    """Why `row` does not run on `device` at this batch size; None when it runs."""
    if row.where not in ("both", device.type):
        return f"{row.where.upper()} only"
    if row.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "bf16 is emulated on this CPU (no avx512_bf16 or amx_bf16), several times slower than fp32"
    if row.bn_group and batch_size <= row.bn_group:
        return f"needs a batch above {row.bn_group} (--batch-size {batch_size})"
    return None


class PILCIFAR10(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's `__getitem__` over in-memory arrays: uint8 HWC -> PIL image -> crop, flip,
    normalise."""

    def __init__(self, arrays: ImageArrays) -> None:
        self.images, self.labels = arrays.x_train.numpy(), arrays.y_train.tolist()
        crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        self.transform = T.Compose([*crop_flip, T.ToTensor(), T.Normalize(BASELINE_MEAN, BASELINE_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


class Baseline:
    """The typical reproduction's loop (kuangliu/pytorch-cifar style): PIL images through a DataLoader, fp32 eager."""

    def __init__(self, model: torch.nn.Module, arrays: ImageArrays, device: torch.device, batch_size: int,
                 workers: int) -> None:  # fmt: skip
        self.model, self.device = model.to(device), device
        # pinned memory on CUDA; drop_last keeps every batch full; persistent workers spare a restart per epoch
        self.loader = torch.utils.data.DataLoader(
            PILCIFAR10(arrays), batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
            drop_last=True, persistent_workers=workers > 0,
        )  # fmt: skip
        self.batches = (batch for _ in itertools.count() for batch in self.loader)  # epoch after epoch
        sgd = {"lr": RECIPE.lr, "momentum": RECIPE.momentum, "weight_decay": RECIPE.weight_decay}
        self.optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
        self.train_loss, self.correct = 0.0, 0

    def run(self, iters: int) -> None:
        """`iters` training iterations as a typical reproduction writes them."""
        self.model.train()
        for _ in range(iters):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in next(self.batches))
            self.optimizer.zero_grad()
            outputs = self.model(inputs)
            loss = F.cross_entropy(outputs, targets)
            loss.backward()
            self.optimizer.step()
            self.train_loss += loss.item()
            self.correct += outputs.argmax(1).eq(targets).sum().item()


class Ours:
    """`engine.fit`'s own iteration, step.EagerIteration or step.GraphedIteration, minus logging and evaluation: the
    model and iteration `fit` builds with the row's settings, over data already on the device."""

    def __init__(self, model: torch.nn.Module, row: Row, data: DeviceData, batch_size: int) -> None:
        model = use_ghost_batch_norm(model, row.bn_group)
        model = model.to(data.device, memory_format=torch.channels_last if row.channels_last else torch.preserve_format)
        optimizer = make_sgd(model, RECIPE.lr, RECIPE.momentum, RECIPE.weight_decay, fused=row.sgd == "fused")
        step = TrainStep(torch.compile(model) if row.compile else model, optimizer, row.precision, data.device)
        acc = Accumulators.zeros(data.device, 0)
        self.iterate = make_iteration(step, data, acc, batch_size, graphs=row.graphs, capture=True)  # as fit does
        if row.graphs and not isinstance(self.iterate, GraphedIteration):
            raise RuntimeError("the CUDA graph capture failed (its warning says why)")
        self.schedule = Schedule(RECIPE.lr, list(RECIPE.milestones), RECIPE.gamma)
        self.iteration = 0

    def run(self, iters: int) -> None:
        """`iters` iterations of fit's loop body."""
        for _ in range(iters):
            self.iterate(self.iteration, self.schedule.lr(self.iteration))
            self.iteration += 1


Runner = Baseline | Ours


def make_runner(row: Row, spec: str, arrays: ImageArrays, device: torch.device, batch_size: int,
                workers: int) -> Runner:  # fmt: skip
    """The runner of `row` for `spec` (e.g. resnet-20): the baseline over `arrays`, or ours with its own copy of them
    on `device`; the model's initial weights from torch seed 0."""
    arch, depth = spec.split("-")
    torch.manual_seed(0)
    model = build_model(arch, int(depth))
    if row.key == "baseline":
        return Baseline(model, arrays, device, batch_size, workers)
    return Ours(model, row, DeviceData(arrays, None, device, "pixel_mean", True, seed=0), batch_size)
