"""The CIFAR-10 networks of He et al. 2015, section 4.2: plain and residual nets of depth 6n+2, and the CIFAR
variant of ResNet-18 built from the same blocks.

Also holds the building blocks the other model files share: conv helpers, the parameter-free option-A shortcut,
stage construction and the He initialisation.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

PAPER_WIDTHS = (16, 32, 64)  # filters of the three stages (32x32, 16x16, 8x8 maps), section 4.2
RESNET18_WIDTHS = (64, 128, 256, 512)

BlockFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BN follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity with stride subsampling and zero-padded extra channels; no parameters.

    A module (not a lambda) so that whole models pickle.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, norm: bool = True) -> nn.Module:
    """Shortcut for option A (zero-pad), B (projection where shape changes) or C (projection always).

    A projection is a strided 1x1 conv followed by BN (``norm=True``) or the bare conv (pre-activation nets).
    """
    reshapes = stride != 1 or in_channels != out_channels
    if kind == "C" or (kind == "B" and reshapes):
        conv = conv1x1(in_channels, out_channels, stride)
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if norm else conv
    if reshapes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


def make_stages(block: BlockFactory, in_channels: int, widths: Sequence[int], blocks_per_stage: int) -> nn.Sequential:
    """Stages of ``blocks_per_stage`` blocks each; the first block of every stage but the first has stride 2."""
    stages = []
    for index, width in enumerate(widths):
        stride = 1 if index == 0 else 2
        blocks = [block(in_channels, width, stride)]
        blocks += [block(width, width, 1) for _ in range(blocks_per_stage - 1)]
        stages.append(nn.Sequential(*blocks))
        in_channels = width
    return nn.Sequential(*stages)


def init_weights(model: nn.Module) -> None:
    """He (MSRA) init for convs (fan_out, ReLU), BN gamma=1 beta=0; Linear keeps PyTorch's default init."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut (none for the plain net), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str | None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None if shortcut is None else make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """3x3 conv-BN-ReLU stem, stages of basic blocks, global average pool, FC.

    ``shortcut=None`` gives the plain net. The paper's nets use ``PAPER_WIDTHS`` with n blocks per stage.
    """

    def __init__(
        self, widths: Sequence[int], blocks_per_stage: int, shortcut: str | None, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.arch = "plain" if shortcut is None else "resnet"
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.stages = make_stages(partial(BasicBlock, shortcut=shortcut), widths[0], widths, blocks_per_stage)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def paper_resnet(depth: int, residual: bool, shortcut: str = "A", num_classes: int = 10) -> CifarResNet:
    """The paper's CIFAR net of depth 6n+2: residual (with ``shortcut`` A/B/C) or plain."""
    return CifarResNet(PAPER_WIDTHS, (depth - 2) // 6, shortcut if residual else None, num_classes)


def resnet18(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 64/128/256/512 channels, two basic blocks per stage, 1x1 conv+BN
    projections where the shape changes (option B)."""
    model = CifarResNet(RESNET18_WIDTHS, 2, "B", num_classes)
    model.arch = "resnet18"
    return model
