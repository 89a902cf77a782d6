"""Numbers that cannot move later: evaluation is fp32 whatever the training precision; runs on different data never
share a run directory; a checkpoint written on other data or in other arithmetic is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    checkpoint_path,
    compose_config,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    run_cli,
    train_in_process,
)

from resnet_repro.data import DeviceData, load_npz
from resnet_repro.engine import evaluate
from resnet_repro.errors import ConfigError
from resnet_repro.models import build_model
from resnet_repro.run_dir import data_dir_name

TINY = ["optim.max_iter=4", "optim.milestones=[2]", "data.batch_size=8", "trainer.log_every=2",
        "trainer.eval_every=4", "trainer.checkpoint_every=2"]


def test_evaluation_is_fp32_even_inside_a_bf16_autocast(sample_npz):
    arrays = load_npz(sample_npz)
    data = DeviceData(arrays, None, torch.device("cpu"), "pixel_mean", augment=False, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet", 8, "A", 10)
    images, labels = data.normalized_test_images(), arrays.y_test
    model(images[:256])  # training-mode forward: BN running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        model.fc.weight.mul_(30)  # confident logits, so that bf16 rounding shows in the loss
        fp32_loss = torch.nn.functional.cross_entropy(model(images).double(), labels).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = torch.nn.functional.cross_entropy(model(images).float().double(), labels).item()
    assert abs(bf16_loss - fp32_loss) > 1e-4  # bf16 moves the number: the check below can tell them apart
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as if called from inside a bf16 training step
        _, loss = evaluate(model, data, "test", 500)
    assert loss == pytest.approx(fp32_loss, abs=1e-6)


def test_data_directory_names():
    assert data_dir_name("cifar10", None, None) == "cifar-10"
    assert data_dir_name("npz", "/x/cifar10_sample.npz", None) == "cifar10-sample"
    assert data_dir_name("npz", "/x/a.npz", "CIFAR-10 (JPEG re-encoded)") == "cifar-10-jpeg-re-encoded"
    assert data_dir_name("cifar10", "/ignored.npz", None) == "cifar-10"


def test_runs_on_other_data_get_their_own_directory_and_a_finished_run_does_not_skip_them(sample_npz, tmp_path):
    """The real command line: the same overrides on two data files train twice, in two run directories."""
    small = make_tiny_npz(sample_npz, tmp_path / "small.npz", n_train=48, n_test=40)
    other = make_tiny_npz(sample_npz, tmp_path / "other.npz", n_train=56, n_test=40)
    runs = tmp_path / "runs"
    for npz in (small, other):
        result = run_cli([*data_overrides(npz), *TINY, "model.depth=8", f"runs_dir={runs}"])
        assert result.returncode == 0, result.stdout
        assert "skipped" not in result.stdout
    [first_path] = (runs / "small" / "default").glob("*/metrics.json")
    [second_path] = (runs / "other" / "default").glob("*/metrics.json")
    assert first_path.parent.name == second_path.parent.name  # the same overrides, on other data
    first, second = json.loads(first_path.read_text()), json.loads(second_path.read_text())
    assert (first["data"]["n_train"], second["data"]["n_train"]) == (48, 56)
    assert first["data"]["sha256"] != second["data"]["sha256"]
    assert first["precision"] == "fp32" and first["eval_precision"] == "fp32"


def _stopped_run(sample_npz, tmp_path, extra: list[str]):
    npz = make_tiny_npz(sample_npz, tmp_path / "data.npz", n_train=48, n_test=40)
    cfg = compose_config([*data_overrides(npz), *TINY, "model.depth=8", *extra])
    run_dir = tmp_path / "run"
    train_in_process(cfg, run_dir)
    assert checkpoint_path(run_dir).exists()
    (run_dir / "metrics.json").unlink()  # a rerun resumes from the last checkpoint (iteration 4)
    return npz, run_dir


def test_resume_refuses_a_checkpoint_written_on_other_data(sample_npz, tmp_path):
    npz, run_dir = _stopped_run(sample_npz, tmp_path, [])
    with np.load(npz) as z:  # the same file name, other pixels
        arrays = {k: z[k] for k in z.files}
    arrays["x_train"] = arrays["x_train"][::-1].copy()
    np.savez(npz, **arrays)
    cfg = compose_config([*data_overrides(npz), *TINY, "model.depth=8"])
    with pytest.raises(ConfigError, match=r"data_sha256=.*other data or other numerics.*delete"):
        train_in_process(cfg, run_dir)


def test_resume_refuses_a_checkpoint_written_in_other_arithmetic(sample_npz, tmp_path):
    npz, run_dir = _stopped_run(sample_npz, tmp_path, ["trainer.precision=bf16"])
    cfg = compose_config([*data_overrides(npz), *TINY, "model.depth=8", "trainer.precision=fp32"])
    with pytest.raises(ConfigError, match=r"precision='bf16', this run has precision='fp32'"):
        train_in_process(cfg, run_dir)
    bf16 = compose_config([*data_overrides(npz), *TINY, "model.depth=8", "trainer.precision=bf16"])
    metrics = train_in_process(bf16, run_dir)  # the same numerics resume
    assert metrics["iterations"] == 4 and metrics["precision"] == "bf16" and metrics["eval_precision"] == "fp32"
