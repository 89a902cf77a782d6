"""Device and precision resolution (CUDA and nvidia-smi stood in for): a machine whose GPUs torch cannot use gets
an error with the fix, never a silent CPU run; torchrun ranks take their GPU before joining the process group."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_support import cli_command, cli_env, compose_config, data_overrides, make_tiny_npz

import resnet_repro.device as device_module
from resnet_repro.config import Device, Precision
from resnet_repro.engine import DistInfo
from resnet_repro.errors import ConfigError
from resnet_repro.train import train

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0c3b6a4e-1111-2222-3333-444455556666)"
SMI_HEADER = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |"


def fake_nvidia_smi(bin_dir: Path, listing: str, exit_code: int = 0) -> Path:
    """An `nvidia-smi` executable in `bin_dir`: `-L` prints `listing` and exits `exit_code`; without arguments it
    prints a driver header."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-L" ]; then printf "%s\\n" "{listing}"; exit {exit_code}; fi\n'
        f'printf "%s\\n" "{SMI_HEADER}"\n'
    )
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def torch_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda reports no GPU, as with a torch build newer than the driver (whatever this machine has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path | None) -> None:
    """PATH holds only `bin_dir` (no nvidia-smi of this machine's when None)."""
    monkeypatch.setenv("PATH", str(bin_dir) if bin_dir is not None else "/nonexistent")


@pytest.mark.parametrize("requested", [Device.auto, Device.cuda])
def test_gpus_torch_cannot_see_are_an_error_with_the_fix(
    requested: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_sees_no_gpu: None
) -> None:
    on_path(monkeypatch, fake_nvidia_smi(tmp_path, f"{H100}\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError) as caught:
        device_module.device_type(requested)
    message = str(caught.value)
    assert message.startswith(f"trainer.device='{requested.value}': nvidia-smi lists 2 GPU(s) ({H100})")
    assert "runs CUDA up to 12.4" in message and f"torch {torch.__version__}" in message
    assert "make install TORCH=cu126" in message and "trainer.device=cpu" in message
    assert "CUDA_VISIBLE_DEVICES" not in message
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='' decides which GPUs torch may use"):
        device_module.device_type(requested)


def test_a_failing_nvidia_smi_is_a_machine_with_gpus_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_sees_no_gpu: None
) -> None:
    failure = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    on_path(monkeypatch, fake_nvidia_smi(tmp_path, failure, exit_code=9))
    with pytest.raises(ConfigError, match=f"nvidia-smi is installed but fails \\({failure}\\)"):
        device_module.device_type(Device.auto)


def test_without_nvidia_gpus_auto_is_the_cpu_and_cuda_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_sees_no_gpu: None
) -> None:
    on_path(monkeypatch, None)
    assert device_module.device_type(Device.auto) == "cpu"
    with pytest.raises(ConfigError, match="trainer.device='cuda' is not allowed: torch sees no GPU"):
        device_module.device_type(Device.cuda)
    on_path(monkeypatch, fake_nvidia_smi(tmp_path, "No devices were found", exit_code=6))
    assert device_module.device_type(Device.auto) == "cpu"


def test_cpu_on_purpose_never_asks_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path(monkeypatch, fake_nvidia_smi(tmp_path, H100))
    monkeypatch.setattr(device_module, "nvidia_smi", lambda *args: pytest.fail("nvidia-smi was run"))
    assert device_module.device_type(Device.cpu) == "cpu"


def test_a_gpu_torch_sees_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module, "nvidia_smi", lambda *args: pytest.fail("nvidia-smi was run"))
    assert device_module.device_type(Device.auto) == device_module.device_type(Device.cuda) == "cuda"


def test_the_run_stops_before_anything_is_built(
    sample_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_sees_no_gpu: None
) -> None:
    on_path(monkeypatch, fake_nvidia_smi(tmp_path / "bin", H100))
    cfg = compose_config(["data=npz", f"data.path={sample_npz}", "trainer.progress=false"])
    with pytest.raises(ConfigError, match="make install TORCH=cu126"):
        train(cfg, tmp_path / "run", DistInfo())
    assert not (tmp_path / "run").exists()


def test_the_command_line_exits_2_with_the_fix(sample_npz: Path, tmp_path: Path) -> None:
    """The real entry point on a machine whose nvidia-smi lists a GPU that torch does not see (hidden here)."""
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz")
    env = cli_env()
    env.update(PATH=f"{fake_nvidia_smi(tmp_path / 'bin', H100)}{os.pathsep}{env['PATH']}", CUDA_VISIBLE_DEVICES="")
    args = [*data_overrides(npz), f"runs_dir={tmp_path / 'runs'}"]
    args = [a for a in args if not a.startswith("trainer.device=")]  # the default, auto
    done = subprocess.run(cli_command(args), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "trainer.device='auto': nvidia-smi lists 1 GPU(s)" in done.stdout + done.stderr
    assert "make install TORCH=cu126" in done.stdout + done.stderr
    assert not list((tmp_path / "runs").rglob("checkpoints"))


def test_torchrun_ranks_take_their_gpu_before_joining_the_process_group(
    sample_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's documented order: torch.cuda.set_device(LOCAL_RANK), then init_process_group bound to that device."""
    events: list[tuple] = []

    class Joined(Exception):
        """Stops train() right after the process group, before anything needs a real GPU."""

    def init_process_group(backend: str, **kwargs) -> None:
        events.append(("init_process_group", backend, kwargs))
        raise Joined

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", device)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(device_module.dist, "init_process_group", init_process_group)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = compose_config(["data=npz", f"data.path={sample_npz}", "trainer.progress=false", "trainer.device=cuda"])
    with pytest.raises(Joined):
        train(cfg, tmp_path / "run", DistInfo(rank=1, world_size=2))
    cuda1 = torch.device("cuda", 1)
    assert events == [("set_device", cuda1), ("init_process_group", "nccl", {"device_id": cuda1})]
    assert torch.backends.cudnn.benchmark  # autotuning on, for CUDA runs


def test_ranks_on_the_cpu_join_with_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(device_module.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    with device_module.job_device("cpu", 2, sweeping=False) as device:
        device_module.init_distributed(device)
    assert calls == [(("gloo",), {})]


def test_one_gpu_run_takes_the_current_gpu_with_cudnn_autotuning(monkeypatch: pytest.MonkeyPatch) -> None:
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with device_module.job_device("cpu", 1, sweeping=False) as device:
        assert device == torch.device("cpu") and not torch.backends.cudnn.benchmark and not current
    with device_module.job_device("cuda", 1, sweeping=False) as device:
        assert device == torch.device("cuda", 3) and current == [device]
        assert torch.backends.cudnn.benchmark


def test_precision_and_layout_follow_the_device() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert device_module.resolve_precision(Precision.auto, cuda) is Precision.bf16
    assert device_module.resolve_precision(Precision.auto, cpu) is Precision.fp32
    assert device_module.resolve_precision(Precision.fp16, cuda) is Precision.fp16
    assert device_module.resolve_precision(Precision.bf16, cpu) is Precision.bf16
    assert device_module.resolve_channels_last(None, cuda) and not device_module.resolve_channels_last(None, cpu)
    assert device_module.resolve_channels_last(True, cpu) and not device_module.resolve_channels_last(False, cuda)


@pytest.mark.parametrize(
    ("overrides", "kind", "world_size", "refusal"),
    [
        (["trainer.precision=fp16"], "cpu", 1, "trainer.precision='fp16' is not allowed: fp16 needs CUDA"),
        (["trainer.cuda_graphs=true", "trainer.precision=fp16"], "cuda", 1,
         "trainer.cuda_graphs=True is not allowed: not with trainer.precision=fp16"),
        (["trainer.cuda_graphs=true"], "cuda", 2, "trainer.cuda_graphs=True is not allowed: one process only"),
        (["trainer.cuda_graphs=true"], "cpu", 1, "trainer.cuda_graphs=True is not allowed: CUDA graphs need a GPU"),
    ],
)
def test_what_the_device_cannot_run_is_refused_by_name(overrides, kind, world_size, refusal) -> None:
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        device_module.check_device_options(compose_config(overrides).trainer, kind, world_size)
    # bf16 on one GPU is fine
    device_module.check_device_options(compose_config(["trainer.cuda_graphs=true"]).trainer, "cuda", 1)
