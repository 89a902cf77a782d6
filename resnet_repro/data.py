"""CIFAR-10 as uint8 tensors, held on the training device, augmented there in whole batches.

Loading happens once: torchvision's CIFAR-10 (downloaded on first use) or an npz file with the arrays
`x_train, y_train, x_test, y_test` (uint8 NHWC RGB, integer labels 0..9).

The training stream is the concatenation of seeded epoch permutations; iteration `i` takes stream
positions [i*B, (i+1)*B), so every batch is full, every image is seen once per epoch, and the data of any
iteration is a pure function of (seed, i). Augmentation (pad 4 zero pixels on each side *after*
normalisation, i.e. pad with the mean image, then a random 32x32 crop and a random horizontal flip, as
in fb.resnet.torch) is drawn per image from the same (seed, epoch) generator. Resuming at any iteration
therefore needs no RNG state.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from resnet_repro.errors import ConfigError

log = logging.getLogger(__name__)

PAD = 4  # pixels of zero padding on each side before the random crop (paper section 4.2)
IMAGE_SIZE = 32
SUM_CHUNK = 1024  # images summed at once for the pixel mean (a 25 MB int64 temporary)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class ImageArrays:
    """A train/test split as CPU tensors: images uint8 (N, 32, 32, 3), labels int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    label: str

    def sha256(self) -> str:
        """sha256 of the four arrays' bytes: the data's identity, whatever file or download it came from."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def load_cifar10(root: str | Path) -> ImageArrays:
    """CIFAR-10 through torchvision (downloaded into `root` the first time), as uint8 tensors."""
    from torchvision.datasets import CIFAR10

    try:
        splits = [CIFAR10(str(root), train=train, download=True) for train in (True, False)]
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"data.root={str(root)!r}: could not load or download CIFAR-10 ({exc}). Check the network, or use "
            "data=npz data.path=FILE.npz"
        ) from exc
    arrays = [t for s in splits for t in (torch.from_numpy(s.data), torch.tensor(s.targets, dtype=torch.int64))]
    return ImageArrays(*arrays, label="CIFAR-10")


def load_npz(path: str | Path, label: str | None = None, num_classes: int = 10) -> ImageArrays:
    """Read an npz of uint8 NHWC images and integer labels, checking every array; errors name the file."""
    path = Path(path)
    where = f"data.path={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in NPZ_KEYS if key in npz.files}
            present = list(npz.files)
    except Exception as exc:  # numpy raises several types for a corrupt archive
        raise ConfigError(f"{where}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise ConfigError(f"{where}: missing arrays {missing}; found {present}; need {list(NPZ_KEYS)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ConfigError(f"{where}: x_{split} must be uint8 of shape (N, 32, 32, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            need = f"integer labels of shape ({x.shape[0]},)"
            raise ConfigError(f"{where}: y_{split} must be {need}, got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ConfigError(f"{where}: y_{split} labels must lie in 0..{num_classes - 1}")
        arrays[f"y_{split}"] = y.astype(np.int64)
    label = label or f"{path.name} ({len(arrays['y_train']):,} train / {len(arrays['y_test']):,} test)"
    return ImageArrays(*(torch.from_numpy(arrays[key]) for key in NPZ_KEYS), label=label)


def split_validation(data: ImageArrays, val_split: int, seed: int) -> tuple[ImageArrays, ImageArrays | None]:
    """Hold out `val_split` training images (a seeded, fixed subset) as a validation set; 0 = no split."""
    if val_split == 0:
        return data, None
    n = len(data.y_train)
    if val_split >= n:
        raise ConfigError(f"data.val_split={val_split} must be smaller than the {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    val_idx, train_idx = perm[:val_split].sort().values, perm[val_split:].sort().values
    val, train = (replace(data, x_train=data.x_train[i], y_train=data.y_train[i]) for i in (val_idx, train_idx))
    return train, val


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (as stored) -> uint8 NCHW (as convolved), contiguous."""
    return images.permute(0, 3, 1, 2).contiguous()


def pixel_mean(images_nchw: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean (1, 3, 32, 32) of uint8 images scaled to [0, 1], float32: an exact integer sum divided
    once in float64, so the bits of a float64 mean without a float64 copy of the images."""
    total = torch.zeros(images_nchw.shape[1:], dtype=torch.int64)
    for chunk in images_nchw.split(SUM_CHUNK):
        total += chunk.sum(dim=0, dtype=torch.int64)
    return (total.double() / (255.0 * len(images_nchw))).float().unsqueeze(0)


class Normalizer:
    """Per-pixel mean subtraction (paper) or per-channel mean/std, with statistics from training images only."""

    def __init__(self, train_images_nchw: torch.Tensor, mode: str, device: torch.device | str = "cpu") -> None:
        if mode == "pixel_mean":
            mean, scale = pixel_mean(train_images_nchw), torch.ones(1, 3, 1, 1)
        elif mode == "channel":
            x = train_images_nchw.to(torch.float64) / 255.0
            mean = x.mean(dim=(0, 2, 3), keepdim=True).float()
            scale = 1.0 / x.std(dim=(0, 2, 3), keepdim=True).float()
        else:
            raise ConfigError(f"data.normalize={mode!r} is not allowed: pixel_mean | channel")
        self.mean, self.scale = mean.to(device), scale.to(device)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float32 NCHW."""
        return (images_uint8.float() / 255.0 - self.mean) * self.scale


class EpochPlan(NamedTuple):
    """Order and augmentation of every image in one epoch (drawn together, so resume needs no RNG state)."""

    order: torch.Tensor  # (N,) permutation of the training set
    offset_y: torch.Tensor  # (N,) crop offsets in [0, 2*PAD]
    offset_x: torch.Tensor
    flip: torch.Tensor  # (N,) bool


def plan_epoch(n: int, seed: int, epoch: int, augment: bool, device: torch.device) -> EpochPlan:
    """Epoch `epoch`'s permutation, crop offsets and flips for `n` images: a pure function of (seed, epoch)."""
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + epoch) % (2**63))
    order = torch.randperm(n, generator=g)
    if augment:
        offsets, flip = torch.randint(0, 2 * PAD + 1, (2, n), generator=g), torch.rand(n, generator=g) < 0.5
    else:
        offsets, flip = torch.full((2, n), PAD, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
    return EpochPlan(*(t.to(device) for t in (order, *offsets, flip)))


def crop_and_flip(
    images: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Pad a float NCHW batch by PAD zeros, take per-image 32x32 crops at the given offsets, flip where asked."""
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    ar = torch.arange(IMAGE_SIZE, device=images.device)
    rows = (offset_y[:, None] + ar)[:, None, :, None]  # (N, 1, 32, 1)
    cols = torch.where(flip[:, None], offset_x[:, None] + IMAGE_SIZE - 1 - ar, offset_x[:, None] + ar)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols[:, None, None, :]]  # cols: (N, 1, 1, 32)


class DeviceData:
    """Training and evaluation images resident on one device as uint8, normalised and augmented there."""

    def __init__(
        self, data: ImageArrays, val: ImageArrays | None, device: torch.device, normalize: str, augment: bool, seed: int
    ) -> None:
        self.device, self.augment, self.seed = device, augment, seed
        self.x_train, self.y_train = to_nchw(data.x_train).to(device), data.y_train.to(device)
        self.normalizer = Normalizer(to_nchw(data.x_train), normalize, device)
        self.x_test, self.y_test = to_nchw(data.x_test).to(device), data.y_test.to(device)
        self.x_val = to_nchw(val.x_train).to(device) if val is not None else None
        self.y_val = val.y_train.to(device) if val is not None else None
        self._plans: dict[int, EpochPlan] = {}  # drawn on first use; only the latest epoch and the one before kept

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    def stream_indices(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image indices, crop offsets and flips of stream positions [start, start+count), across epochs."""
        parts = []
        while count > 0:
            epoch, within = divmod(start, self.n_train)
            take = min(count, self.n_train - within)
            if epoch not in self._plans:
                self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
                self._plans[epoch] = plan_epoch(self.n_train, self.seed, epoch, self.augment, self.device)
            parts.append(tuple(t[within : within + take] for t in self._plans[epoch]))
            start, count = start + take, count - take
        return parts[0] if len(parts) == 1 else tuple(torch.cat(c) for c in zip(*parts))  # type: ignore[return-value]

    def train_batch(self, iteration: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """The (images, labels) of `iteration`: this rank's slice of the global batch, normalised and augmented."""
        per_rank = batch_size // world_size
        return self.gather(*self.stream_indices(iteration * batch_size + rank * per_rank, per_rank))

    def gather(
        self, idx: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of training images `idx`, normalised, padded, cropped at the offsets, flipped."""
        return crop_and_flip(self.normalizer(self.x_train[idx]), offset_y, offset_x, flip), self.y_train[idx]

    def eval_batches(self, split: str, batch_size: int):
        """Yield normalised, unaugmented (images, labels) of the test or val split."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        for start in range(0, len(y), batch_size):
            yield self.normalizer(x[start : start + batch_size]), y[start : start + batch_size]

    def normalized_test_images(self) -> torch.Tensor:
        """The whole test set, normalised (for Figure-7 layer responses)."""
        return self.normalizer(self.x_test)
