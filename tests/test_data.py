"""Loading (sample npz, malformed files), normalisation from training images only, on-device augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_repro.data import (
    PAD,
    DeviceData,
    ImageArrays,
    Normalizer,
    crop_and_flip,
    load_npz,
    pixel_mean,
    plan_epoch,
    split_validation,
    to_nchw,
)
from resnet_repro.errors import ConfigError

SAMPLE_TRAIN_CLASS_COUNTS = [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
SAMPLE_TEST_CLASS_COUNTS = [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


@pytest.fixture(scope="module")
def sample(sample_npz) -> ImageArrays:
    return load_npz(sample_npz)


def test_sample_loads_with_documented_shapes_and_labels(sample):
    assert sample.x_train.shape == (5085, 32, 32, 3) and sample.x_train.dtype == torch.uint8
    assert sample.x_test.shape == (1017, 32, 32, 3) and sample.y_test.dtype == torch.int64
    assert torch.bincount(sample.y_train).tolist() == SAMPLE_TRAIN_CLASS_COUNTS
    assert torch.bincount(sample.y_test).tolist() == SAMPLE_TEST_CLASS_COUNTS
    means = (sample.x_train.double() / 255).mean(dim=(0, 1, 2))
    assert torch.allclose(means, torch.tensor([0.4936, 0.4846, 0.4483], dtype=torch.float64), atol=1e-4)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good_arrays(n=4):
    x = np.zeros((n, 32, 32, 3), np.uint8)
    y = np.arange(n) % 10
    return {"x_train": x, "y_train": y, "x_test": x, "y_test": y}


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.pop("y_test"), r"missing arrays \['y_test'\]"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), r"x_train must be uint8 of shape \(N, 32, 32,"),
        (lambda a: a.update(x_test=np.zeros((4, 3, 32, 32), np.uint8)), r"x_test must be uint8 of shape"),
        (lambda a: a.update(y_train=np.arange(3)), r"y_train must be integer labels of shape \(4,\)"),
        (lambda a: a.update(y_test=np.array([0, 1, 2, 10])), r"y_test labels must lie in 0..9"),
    ],
)
def test_malformed_npz_is_rejected_naming_file_and_problem(tmp_path, mutate, message):
    arrays = _good_arrays()
    mutate(arrays)
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value) and "data.path" in str(info.value)


def test_missing_and_corrupt_files_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_npz(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError, match="not a readable .npz file"):
        load_npz(garbage)


def test_pixel_mean_comes_from_training_images_only(sample):
    train, _ = split_validation(sample, 500, seed=0)
    norm = Normalizer(to_nchw(train.x_train), "pixel_mean")
    assert torch.equal(norm.mean, _float64_pixel_mean(to_nchw(train.x_train)))
    test_mean = to_nchw(sample.x_test).double().div(255).mean(dim=0, keepdim=True).float()
    assert not torch.allclose(norm.mean, test_mean, atol=1e-3)  # test images would give a different mean
    assert norm.mean.shape == (1, 3, 32, 32) and torch.equal(norm.scale, torch.ones(1, 3, 1, 1))
    normalized = norm(to_nchw(train.x_train))
    assert normalized.mean(dim=0).abs().max() < 1e-4  # per-pixel mean removed exactly


def _float64_pixel_mean(images_nchw: torch.Tensor) -> torch.Tensor:
    """The formula the integer sum replaces: a float64 copy of the images, scaled, averaged, cast to float32."""
    return (images_nchw.to(torch.float64) / 255.0).mean(dim=0, keepdim=True).float()


def test_the_integer_pixel_mean_has_the_float64_formulas_bits(sample):
    g = torch.Generator().manual_seed(0)
    cases = {
        "sample train": to_nchw(sample.x_train),  # 5085 images: several chunks and a partial one
        "sample test": to_nchw(sample.x_test),
        "random": torch.randint(0, 256, (3001, 3, 32, 32), generator=g, dtype=torch.uint8),
        "dark, with a few bright pixels": torch.randint(0, 3, (777, 3, 32, 32), generator=g, dtype=torch.uint8) * 127,
        "all 255": torch.full((1025, 3, 32, 32), 255, dtype=torch.uint8),
        "one image": to_nchw(sample.x_train[:1]),
    }
    for name, images in cases.items():
        mean = pixel_mean(images)
        assert mean.dtype == torch.float32 and mean.shape == (1, 3, 32, 32), name
        assert torch.equal(mean, _float64_pixel_mean(images)), name
    assert torch.equal(pixel_mean(cases["all 255"]), torch.ones(1, 3, 32, 32))


def test_validation_split_is_fixed_disjoint_and_seeded(sample):
    train_a, val_a = split_validation(sample, 1000, seed=3)
    train_b, val_b = split_validation(sample, 1000, seed=3)
    assert torch.equal(val_a.x_train, val_b.x_train) and len(val_a.y_train) == 1000
    assert len(train_a.y_train) == 5085 - 1000
    rows = {bytes(x.numpy()) for x in val_a.x_train}
    assert not rows & {bytes(x.numpy()) for x in train_a.x_train[:500]}
    _, val_other = split_validation(sample, 1000, seed=4)
    assert not torch.equal(val_a.x_train, val_other.x_train)


def test_all_81_crop_offsets_occur_and_flip_rate_is_half():
    plan = plan_epoch(20000, seed=0, epoch=0, augment=True, device=torch.device("cpu"))
    offsets = set(zip(plan.offset_y.tolist(), plan.offset_x.tolist()))
    assert offsets == {(y, x) for y in range(2 * PAD + 1) for x in range(2 * PAD + 1)}
    assert abs(plan.flip.float().mean().item() - 0.5) < 0.02
    assert sorted(plan.order.tolist()) == list(range(20000))


def test_crop_and_flip_match_per_image_reference():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    oy, ox = torch.tensor([0, 8, 4, 3, 0, 8]), torch.tensor([8, 0, 4, 5, 0, 8])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_and_flip(images, oy, ox, flip)
    for i in range(6):
        padded = torch.nn.functional.pad(images[i], (PAD,) * 4)  # zeros after normalisation = the mean image
        ref = padded[:, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    centre = crop_and_flip(images, torch.full((6,), PAD), torch.full((6,), PAD), torch.zeros(6, dtype=torch.bool))
    assert torch.equal(centre, images)


def test_padding_is_zero_after_normalisation(sample):
    data = DeviceData(sample, None, torch.device("cpu"), "pixel_mean", True, seed=0)
    idx, oy, ox, flip = data.stream_indices(0, 256)
    batch, _ = data.train_batch(0, 256)
    corner = (oy == 0) & (ox == 0)
    assert corner.any()
    assert torch.all(batch[corner][:, :, :PAD, :] == 0)  # top padding rows are exactly zero


def test_stream_is_a_pure_function_of_seed_and_iteration(sample):
    a = DeviceData(sample, None, torch.device("cpu"), "pixel_mean", True, seed=1)
    b = DeviceData(sample, None, torch.device("cpu"), "pixel_mean", True, seed=1)
    n = a.n_train
    it = n // 128  # this batch straddles the first epoch boundary
    xa, ya = a.train_batch(it, 128)
    for i in range(it + 3):  # b sees other batches first; the result must not depend on that
        b.train_batch(i, 128)
    xb, yb = b.train_batch(it, 128)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    idx, *_ = a.stream_indices(0, 2 * n)
    assert sorted(idx[:n].tolist()) == list(range(n)) and sorted(idx[n:].tolist()) == list(range(n))
    assert not torch.equal(idx[:n], idx[n:])  # a new permutation each epoch


def test_test_images_are_untouched_by_augmentation(sample):
    data = DeviceData(sample, None, torch.device("cpu"), "pixel_mean", True, seed=0)
    images, labels = next(data.eval_batches("test", 100))
    assert torch.equal(images, data.normalizer(to_nchw(sample.x_test[:100])))
    assert torch.equal(labels, sample.y_test[:100])


def test_ranks_take_disjoint_halves_of_the_global_batch(sample):
    data = DeviceData(sample, None, torch.device("cpu"), "pixel_mean", True, seed=0)
    whole, y = data.train_batch(5, 128)
    first, y0 = data.train_batch(5, 128, rank=0, world_size=2)
    second, y1 = data.train_batch(5, 128, rank=1, world_size=2)
    assert torch.equal(torch.cat([first, second]), whole) and torch.equal(torch.cat([y0, y1]), y)
