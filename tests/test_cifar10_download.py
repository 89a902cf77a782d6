"""`data=cifar10` without a network: torchvision's own CIFAR10 class reads a cifar-10-batches-py folder written here
from the real sample's images, in the layout of the real download (pickled batches, CHW rows, batches.meta)."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import in_process_entry
from torchvision.datasets import CIFAR10

import resnet_repro.train as train_module
from resnet_repro.data import load_cifar10, load_npz
from resnet_repro.errors import ConfigError

# batches.meta's label_names: label i of every batch is this class
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = 5


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_batch(path: Path, images_nhwc: np.ndarray, labels: np.ndarray, name: str) -> list[str]:
    """One pickled batch as in the real archive: `data` uint8 (N, 3072) rows of R, G, B planes, `labels` a list."""
    rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    entry = {"batch_label": name, "labels": labels.tolist(), "data": rows,
             "filenames": [f"image_{i:05d}.png" for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(entry, protocol=2))
    return [path.name, _md5(path)]


@pytest.fixture
def cifar10_root(sample_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data.root whose cifar-10-batches-py holds the sample (its 5,085 training images in five batches). The
    checksums torchvision verifies are these files'; a download attempt fails the test."""
    folder = tmp_path / "data" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    with np.load(sample_npz) as z:
        x_train, y_train, x_test, y_test = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    parts = zip(np.array_split(x_train, TRAIN_BATCHES), np.array_split(y_train, TRAIN_BATCHES), strict=True)
    train_list = [
        _write_batch(folder / f"data_batch_{i}", x, y, f"training batch {i} of {TRAIN_BATCHES}")
        for i, (x, y) in enumerate(parts, start=1)
    ]
    test_list = [_write_batch(folder / "test_batch", x_test, y_test, "testing batch 1 of 1")]
    meta = folder / "batches.meta"
    meta.write_bytes(pickle.dumps({"num_cases_per_batch": len(y_train) // TRAIN_BATCHES, "label_names": CLASSES,
                                   "num_vis": 3072}, protocol=2))
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(meta)})

    def no_network(*args, **kwargs):
        pytest.fail(f"torchvision tried to download CIFAR-10: {args}")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    return tmp_path / "data"


def test_cifar10_loads_the_real_layout_into_the_arrays_npz_gives(cifar10_root: Path, sample_npz: Path) -> None:
    arrays = load_cifar10(cifar10_root)  # download=True, as data=cifar10 runs: files present, nothing fetched
    assert arrays.x_train.shape == (5085, 32, 32, 3) and arrays.x_test.shape == (1017, 32, 32, 3)
    assert arrays.x_train.dtype == arrays.x_test.dtype == torch.uint8
    assert arrays.y_train.dtype == arrays.y_test.dtype == torch.int64
    assert arrays.label == "CIFAR-10"
    npz = load_npz(sample_npz)
    for name in ("x_train", "y_train", "x_test", "y_test"):  # HWC images, labels and their order unchanged
        assert torch.equal(getattr(arrays, name), getattr(npz, name)), name
    assert arrays.sha256() == npz.sha256()
    assert CIFAR10(str(cifar10_root), train=False).classes == CLASSES  # label i is CLASSES[i]
    assert torch.bincount(arrays.y_test).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def test_a_missing_download_names_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(ConfigError, match=r"data.root='.*empty'.*could not load or download CIFAR-10.*data=npz"):
        load_cifar10(tmp_path / "empty")


def test_two_iterations_of_data_cifar10_through_the_command_line(
    cifar10_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    args = ["data=cifar10", f"data.root={cifar10_root}", f"runs_dir={runs}", "model.depth=8", "data.batch_size=16",
            "optim.max_iter=2", "optim.milestones=[1]", "trainer.log_every=1", "trainer.eval_every=2",
            "trainer.checkpoint_every=2", "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false"]
    monkeypatch.setattr(sys, "argv", ["resnet_repro.train", *args])
    with in_process_entry():
        train_module.cli()
    (metrics_file,) = runs.rglob("metrics.json")
    assert metrics_file.parent.parent.parent.name == "cifar-10"  # runs/<data>/<experiment>/<run>
    metrics = json.loads(metrics_file.read_text())
    assert metrics["iterations"] == 2 and metrics["status"] == "finished"
    assert metrics["data"]["name"] == "cifar10" and metrics["data"]["label"] == "CIFAR-10"
    assert (metrics["data"]["n_train"], metrics["data"]["n_test"]) == (5085, 1017)
    assert 0 <= metrics["final_test_err"] <= 100 and np.isfinite(metrics["final_train_loss"])
