"""What a row runs: the typical reproduction's training loop, or our runner's own iteration (resnet_repro/step.py)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from resnet_repro.bench.rows import Row
from resnet_repro.config import OptimConfig
from resnet_repro.data import DeviceData, ImageArrays
from resnet_repro.models import build_model
from resnet_repro.models.ghost_bn import use_ghost_batch_norm
from resnet_repro.optim import Schedule, make_sgd
from resnet_repro.step import Accumulators, GraphedIteration, TrainStep, make_iteration

RECIPE = OptimConfig()  # the paper's SGD: lr, momentum, weight decay, milestones, 64k iterations
# The usual public reproductions normalise with these CIFAR-10 channel statistics (the cost is what matters here).
BASELINE_MEAN, BASELINE_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class PILCIFAR10(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's `__getitem__` over in-memory arrays: uint8 HWC -> PIL image -> transform."""

    def __init__(self, arrays: ImageArrays) -> None:
        """The training images and labels of `arrays`, with random crop, flip and normalisation."""
        self.images, self.labels = arrays.x_train.numpy(), arrays.y_train.tolist()
        crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        self.transform = T.Compose([*crop_flip, T.ToTensor(), T.Normalize(BASELINE_MEAN, BASELINE_STD)])

    def __len__(self) -> int:
        """The number of training images."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image `index` as a transformed float tensor, and its label."""
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


class Baseline:
    """The typical reproduction's loop (kuangliu/pytorch-cifar style): PIL images through a DataLoader, fp32 eager."""

    def __init__(self, arch: str, depth: int, arrays: ImageArrays, device: torch.device, batch_size: int,
                 workers: int) -> None:  # fmt: skip
        """The model, plain SGD and a DataLoader with `workers` worker processes over `arrays`."""
        self.device = device
        # pinned memory on CUDA; drop_last keeps every batch full; persistent workers spare a restart per epoch
        self.loader = torch.utils.data.DataLoader(
            PILCIFAR10(arrays), batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
            drop_last=True, persistent_workers=workers > 0,
        )  # fmt: skip
        self.batches = (batch for _ in itertools.count() for batch in self.loader)  # epoch after epoch
        torch.manual_seed(0)
        self.model = build_model(arch, depth).to(device)
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
    """`engine.fit`'s own iteration, step.EagerIteration or step.GraphedIteration, minus logging and evaluation."""

    def __init__(self, arch: str, depth: int, row: Row, data: DeviceData, batch_size: int) -> None:
        """The model and iteration `fit` would build with `row`'s settings, over `data` already on the device."""
        torch.manual_seed(0)
        model = use_ghost_batch_norm(build_model(arch, depth), row.bn_group)
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


def make_runner(row: Row, arch: str, depth: int, arrays: ImageArrays, device: torch.device, batch_size: int,
                workers: int) -> Runner:  # fmt: skip
    """The runner of `row`: the baseline over `arrays`, or ours with its own copy of them on `device`."""
    if row.key == "baseline":
        return Baseline(arch, depth, arrays, device, batch_size, workers)
    return Ours(arch, depth, row, DeviceData(arrays, None, device, "pixel_mean", True, seed=0), batch_size)
