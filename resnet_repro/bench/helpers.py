"""Random CIFAR-shaped images for the benchmark's runners."""

from __future__ import annotations

import torch

from resnet_repro.data import ImageArrays


def random_cifar(n_train: int, n_test: int, seed: int = 0) -> ImageArrays:
    """Random uint8 images of CIFAR-10 shape (N, 32, 32, 3) and labels 0..9 (throughput ignores pixel values)."""
    g = torch.Generator().manual_seed(seed)
    return ImageArrays(
        x_train=torch.randint(0, 256, (n_train, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.randint(0, 256, (n_test, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        label=f"random uint8 ({n_train} train)",
    )
