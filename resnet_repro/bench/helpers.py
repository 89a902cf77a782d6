"""Small helpers of the benchmark: random CIFAR-shaped data, device sync, byte counts, file-name slugs."""

from __future__ import annotations

import re

import torch

from resnet_repro.data import ImageArrays


def random_cifar(n_train: int, n_test: int, seed: int = 0) -> ImageArrays:
    """Random uint8 images of CIFAR-10 shape (N, 32, 32, 3) and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    return ImageArrays(
        x_train=torch.randint(0, 256, (n_train, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.randint(0, 256, (n_test, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        label=f"random uint8 ({n_train} train)",
    )


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages among `tensors` (None entries ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, buffers, gradients and optimizer state."""
    ts = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    for state in optimizer.state.values():
        ts += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts)


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
