"""The full-scale data path on CPU: decode a few hundred of the JPEG re-encoded CIFAR-10 images to npz and train.

The JPEG set (a folder `cifar10-jpeg` beside the CIFAR-10 sample) holds all 60,000 images as
train|test/<class>/NNNN.jpg, numbered in the official order within each class; its to_npz.py decodes them all
(about 20 s) for GPU runs. Here every 100th file is decoded the same way (PIL, RGB) and checked against the
genuine pixels of the CIFAR-10 sample.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from resnet_repro.data import load_npz

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10_jpeg.tar.xz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def decoded() -> dict[str, list[tuple[int, int, np.ndarray]]]:
    if not ARCHIVE.is_file():
        pytest.skip(f"JPEG archive not found at {ARCHIVE}")
    splits: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            split, cls, name = member.name.split("/")
            number = int(name.split(".")[0])
            if number % 100 == 0 or (split == "test" and number < 5):
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                splits[split].append((CLASSES.index(cls), number, np.asarray(image, dtype=np.uint8)))
    return splits


def test_decoded_subset_loads_in_the_npz_layout(decoded, tmp_path):
    arrays = {}
    for split, items in decoded.items():
        arrays[f"x_{split}"] = np.stack([image for _, _, image in items])
        arrays[f"y_{split}"] = np.array([label for label, _, _ in items], dtype=np.int64)
    path = tmp_path / "jpeg_subset.npz"
    np.savez(path, **arrays)
    data = load_npz(path, label="CIFAR-10 (JPEG re-encoded), every 100th image")
    assert data.x_train.shape == (500, 32, 32, 3)
    assert data.x_test.shape[0] == 100 + 40  # every 100th, plus numbers 1-4 of each class
    assert torch.bincount(data.y_train).tolist() == [50] * 10
    means = data.x_train.double().div(255).mean(dim=(0, 1, 2))
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=0.04)


def test_decoded_pixels_match_the_genuine_sample(decoded, sample_npz):
    """test/<class>/000k.jpg is the k-th test image of that class: PSNR against the original pixels 20-40 dB."""
    with np.load(sample_npz) as sample:
        x_test, y_test = sample["x_test"], sample["y_test"]
    checked = 0
    for label, number, image in decoded["test"]:
        if number >= 5:
            continue
        original = x_test[np.flatnonzero(y_test == label)[number]]
        mse = np.mean((image.astype(np.float64) - original.astype(np.float64)) ** 2)
        psnr = 10 * np.log10(255.0**2 / mse)
        assert 20.0 < psnr < 40.0, (CLASSES[label], number, psnr)
        flipped = 10 * np.log10(255.0**2 / np.mean((image[:, ::-1].astype(np.float64) - original) ** 2))
        assert psnr > flipped  # orientation and channel order are right
        checked += 1
    assert checked == 50
