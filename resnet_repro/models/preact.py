"""Pre-activation residual nets of He et al. 2016 ("Identity Mappings"): basic (6n+2) and bottleneck (9n+2).

Shortcut choice (the ``shortcut`` argument of the basic net): ``"A"`` is the parameter-free zero-pad identity of the
2015 paper; ``"B"`` is a 1x1 projection where the shape changes, as in the 2016 paper's CIFAR code. ``build_model``'s
default is ``"A"`` (parameter-identical to the paper's option-A net); ``configs/model/preact.yaml`` selects ``"B"``.
The bottleneck net always projects where the shape changes (its first block already widens 16 -> 64 channels).
Following the 2016 code (resnet-1k-layers), a projection is a bare 1x1 conv (the next block's BN normalises the sum)
and it reads the pre-activated input BN-ReLU(x); identity and zero-pad shortcuts read x itself.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.models.cifar_resnet import (
    PAPER_WIDTHS,
    BlockFactory,
    conv1x1,
    conv3x3,
    init_weights,
    make_shortcut,
    make_stages,
)

BOTTLENECK_EXPANSION = 4  # bottleneck output channels / 3x3 channels (16/32/64 -> 64/128/256)


class _PreActBlock(nn.Module):
    """BN-ReLU pre-activation shared by the residual branch and (for projections) the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm=False)
        self.projects = isinstance(self.shortcut, nn.Conv2d)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        """Residual branch applied to the pre-activated input."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        return self.branch(pre) + self.shortcut(pre if self.projects else x)


class PreActBasicBlock(_PreActBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__(in_channels, out_channels, stride, shortcut)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        """conv3x3 -> BN-ReLU -> conv3x3."""
        return self.conv2(F.relu(self.bn2(self.conv1(pre))))


class PreActBottleneck(_PreActBlock):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1 (x4 channels), plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, stride, "B")
        mid = out_channels // BOTTLENECK_EXPANSION
        self.conv1 = conv1x1(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_channels)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        """conv1x1 -> BN-ReLU -> conv3x3 -> BN-ReLU -> conv1x1."""
        out = F.relu(self.bn2(self.conv1(pre)))
        return self.conv3(F.relu(self.bn3(self.conv2(out))))


class PreActResNet(nn.Module):
    """3x3 conv stem, three stages of pre-activation blocks, final BN-ReLU, global average pool, FC."""

    def __init__(self, arch: str, block: BlockFactory, blocks_per_stage: int, expansion: int, num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        widths = [width * expansion for width in PAPER_WIDTHS]
        self.conv1 = conv3x3(3, PAPER_WIDTHS[0])
        self.stages = make_stages(block, PAPER_WIDTHS[0], widths, blocks_per_stage)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def preact_resnet(depth: int, shortcut: str = "A", num_classes: int = 10) -> PreActResNet:
    """Pre-activation basic-block net of depth 6n+2 (shortcut A: zero-pad identity, B: projection)."""
    block = partial(PreActBasicBlock, shortcut=shortcut)
    return PreActResNet("preact", block, (depth - 2) // 6, 1, num_classes)


def preact_bottleneck(depth: int, num_classes: int = 10) -> PreActResNet:
    """Pre-activation bottleneck net of depth 9n+2 (ResNet-164: n=18), projections where the shape changes."""
    return PreActResNet("bottleneck", PreActBottleneck, (depth - 2) // 9, BOTTLENECK_EXPANSION, num_classes)
