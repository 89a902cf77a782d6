"""`make reproduce PROFILE=cpu`: Figure 6 on the full data with a shortened schedule of the paper's shape, on the CPU,
in the fastest numerics measured for the CPU it runs on."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from resnet_repro import device, reproduce
from resnet_repro.train import CONFIG_DIR


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, monkeypatch) -> None:
    zen4, zen1 = tmp_path / "zen4", tmp_path / "zen1"
    zen4.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    zen1.write_text("flags\t\t: fpu sse avx2 fma sha_ni\n")
    assert device.cpu_has_native_bf16(zen4) and not device.cpu_has_native_bf16(zen1)
    assert not device.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.cpu_speed_overrides() == ["trainer.precision=bf16", "trainer.channels_last=true"]
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.cpu_speed_overrides() == ["trainer.precision=fp32", "trainer.channels_last=true"]


def test_the_cpu_profile_trains_plain_then_resnet_on_the_cpu(capsys, monkeypatch) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    label = "CIFAR-10 (JPEG re-encoded)"
    assert reproduce.main(["--profile", "cpu", "--dry-run", "--data", "j.npz", "--label", label]) == 0
    lines = capsys.readouterr().out.splitlines()
    py, data = sys.executable, ["data=npz", f"data.path={Path('j.npz').resolve()}", f'data.label="{label}"']
    speed = ["trainer.device=cpu", "trainer.precision=fp32", "trainer.channels_last=true"]
    assert lines[:2] == [
        shlex.join([py, "-m", "resnet_repro.train", "-m", "experiment=fig6_cpu", f"model.arch={arch}", "runs_dir=runs",
                    *data, *speed])
        for arch in ("plain", "resnet")
    ]
    assert "--out results/cifar-10-jpeg-re-encoded/cpu --title-suffix" in lines[2]
    assert "runs/cifar-10-jpeg-re-encoded/fig6_cpu/sweep_summary.json" in lines[3]


def test_the_command_line_wins_over_the_profile_numerics(capsys, monkeypatch) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert reproduce.main(["--profile", "cpu", "--dry-run", "--data", "j.npz", "trainer.precision=fp32"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("trainer.device=cpu trainer.channels_last=true trainer.precision=fp32")
    assert "bf16" not in first


def test_fig6_cpu_is_the_paper_recipe_with_a_shortened_schedule_of_the_same_shape() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        job = compose(config_name="train", overrides=["experiment=fig6_cpu"])
    o, d = job.optim, job.data
    assert "SHORTENED" in (Path(CONFIG_DIR) / "experiment" / "fig6_cpu.yaml").read_text()
    assert 0 < o.max_iter < 64000 and list(o.milestones) == [o.max_iter // 2, o.max_iter * 3 // 4]
    assert (o.lr, o.momentum, o.weight_decay, o.gamma, o.warmup) == (0.1, 0.9, 1e-4, 0.1, None)
    assert (d.batch_size, d.val_split, d.augment) == (128, 0, True) and job.model.bn_group == 0
    assert o.max_iter % job.trainer.eval_every == 0 and o.max_iter % job.trainer.log_every == 0
    assert job.responses  # Figure 7 from the same runs


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_each_half_sweeps_four_depths_deepest_first(arch: str) -> None:
    text = (Path(CONFIG_DIR) / "experiment" / "fig6_cpu.yaml").read_text()
    assert "model.arch: plain,resnet" in text and "model.depth: 56,44,32,20" in text
    assert reproduce.PROFILES["cpu"][["plain", "resnet"].index(arch)].overrides == (f"model.arch={arch}",)
