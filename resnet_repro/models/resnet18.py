"""CIFAR variant of ResNet-18: 3x3 stem, no max-pool, 64/128/256/512 channels, [2, 2, 2, 2] basic blocks."""

from resnet_repro.models.cifar_resnet import CifarResNet

RESNET18_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS_PER_STAGE = 2


class ResNet18(CifarResNet):
    """The paper's post-activation basic blocks with 1x1 conv+BN projections where the shape changes (option B)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(RESNET18_WIDTHS, RESNET18_BLOCKS_PER_STAGE, "B", num_classes)
        self.arch = "resnet18"
