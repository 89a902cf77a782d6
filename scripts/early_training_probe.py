#!/usr/bin/env python
"""Early training of a CIFAR ResNet at a constant learning rate: ours against an independent reference model.

Both nets see the same data stream (resnet_repro.data.DeviceData: seeded order, crops and flips) and train with
plain `torch.optim.SGD` (momentum 0.9, weight decay 1e-4), so a difference in the loss curve points at the model.
The reference is written here the way the most-cited public PyTorch CIFAR ResNet writes it (He init with
fan_in on convs and the FC layer, option A as a lambda), independently of resnet_repro.models.

    python scripts/early_training_probe.py --npz cifar10_sample.npz --depth 56 --model ours --iters 600

Prints the loss every `--every` iterations and the test error at the end. Written to answer one question: does
ResNet-56 at the paper's lr 0.1 really blow up in its first iterations, and is that ours or the recipe's?
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.data import DeviceData, load_npz
from resnet_repro.models import build_model


class _Lambda(nn.Module):
    """A function as a module (the reference's option-A shortcut)."""

    def __init__(self, fn) -> None:
        """Wrap `fn`."""
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`fn(x)`."""
        return self.fn(x)


class _Block(nn.Module):
    """The reference's basic block: two 3x3 convs with BN, the shortcut zero-padding channels when they grow."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        """A block from `cin` to `cout` channels, subsampling by `stride`."""
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        pad = cout // 4
        self.shortcut = (
            _Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad)))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(F(x) + shortcut(x))."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ReferenceResNet(nn.Module):
    """A CIFAR ResNet of depth 6n+2 with option-A shortcuts, written as public reproductions usually write it."""

    def __init__(self, depth: int) -> None:
        """Three stages of (depth - 2) / 6 blocks at 16, 32 and 64 channels; He (fan_in) init of convs and FC."""
        super().__init__()
        n = (depth - 2) // 6
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(n):
                blocks.append(_Block(cin, width, 2 if stage > 0 and index == 0 else 1))
                cin = width
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def main() -> None:
    """Train one model for `--iters` iterations and print its loss curve and final test error."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", required=True, help="data in the npz layout of data=npz")
    p.add_argument("--model", choices=("ours", "reference"), default="ours")
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=25)
    args = p.parse_args()
    data = DeviceData(load_npz(args.npz), None, torch.device("cpu"), "pixel_mean", True, args.seed)
    torch.manual_seed(args.seed)
    model = build_model("resnet", args.depth) if args.model == "ours" else ReferenceResNet(args.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    started, losses = time.time(), []
    for it in range(args.iters):
        images, labels = data.train_batch(it, 128)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if it < 10 or (it + 1) % args.every == 0:
            recent = losses[-args.every :]
            print(
                f"{args.model} iter {it + 1} loss {losses[-1]:.3f} mean of last {len(recent)} "
                f"{sum(recent) / len(recent):.3f} ({time.time() - started:.0f} s)",
                flush=True,
            )
    model.eval()
    wrong = 0
    with torch.no_grad():
        for images, labels in data.eval_batches("test", 500):
            wrong += (model(images).argmax(1) != labels).sum().item()
    print(
        f"{args.model} ResNet-{args.depth} lr {args.lr} seed {args.seed}: test error after {args.iters} "
        f"iterations {100 * wrong / len(data.y_test):.2f}%"
    )


if __name__ == "__main__":
    main()
