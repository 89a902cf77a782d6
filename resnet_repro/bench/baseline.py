"""The typical public PyTorch reproduction, written from its usual recipe: PIL images through a DataLoader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from resnet_repro.bench.helpers import model_state_bytes
from resnet_repro.bench.variants import (
    BASE_LR,
    BASELINE_CUDNN_BENCHMARK,
    BASELINE_MEAN,
    BASELINE_STD,
    MOMENTUM,
    WEIGHT_DECAY,
)
from resnet_repro.data import ImageArrays
from resnet_repro.models import build_model


class PILCIFAR10(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's `__getitem__` over in-memory arrays: uint8 HWC -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable | None) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class BaselineRunner:
    """The typical reproduction's training loop (kuangliu/pytorch-cifar style), timed per iteration."""

    def __init__(
        self, arch: str, depth: int, arrays: ImageArrays, device: torch.device, batch_size: int, workers: int
    ) -> None:
        import torchvision.transforms as T

        self.device = device
        transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(BASELINE_MEAN, BASELINE_STD),
            ]
        )
        dataset = PILCIFAR10(arrays.x_train.numpy(), arrays.y_train.tolist(), transform)
        # drop_last keeps every timed batch full; persistent workers spare the baseline a restart per window.
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
        )
        self.loader_settings = {
            "workers": workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0,
        }
        torch.manual_seed(0)
        self.model = build_model(arch, depth).to(device)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self._it = iter(self.loader)
        self.train_loss, self.correct, self.total = 0.0, 0, 0
        self.one_time_note = "DataLoader workers start + first batches"

    def prepare(self, warmup: int) -> None:
        """Warm-up iterations (start the workers, first cuDNN calls)."""
        self.run(warmup)

    def cudnn_benchmark(self) -> bool:
        """Typical reproductions turn cuDNN autotuning on."""
        return BASELINE_CUDNN_BENCHMARK

    def run(self, iters: int) -> None:
        """`iters` training iterations exactly as a typical reproduction writes them."""
        self.model.train()
        for _ in range(iters):
            try:
                inputs, targets = next(self._it)
            except StopIteration:  # end of an epoch: a typical loop starts the next `for ... in loader`
                self._it = iter(self.loader)
                inputs, targets = next(self._it)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad()
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
            loss.backward()
            self.optimizer.step()
            self.train_loss += loss.item()
            _, predicted = outputs.max(1)
            self.total += targets.size(0)
            self.correct += predicted.eq(targets).sum().item()

    def resident_bytes(self) -> int:
        """Device bytes this configuration keeps between steps (data stays on the host)."""
        return model_state_bytes(self.model, self.optimizer)

    def checkpoint_state(self) -> dict[str, Any]:
        """Not used for the baseline."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the DataLoader workers."""
        del self._it
        self.loader = None  # type: ignore[assignment]
