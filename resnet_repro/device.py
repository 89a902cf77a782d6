"""Where a run trains and in what arithmetic: trainer.device, precision and channels_last resolved on this machine."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from resnet_repro.config import Device, Precision, TrainerConfig, require
from resnet_repro.errors import ConfigError
from resnet_repro.gpu_slots import acquire_gpu_slot, cuda_gpu_keys, runs_per_gpu

# Which `make install TORCH=...` build a driver runs: CUDA 12 builds need a driver >= 525 (CUDA's minor-version
# compatibility), CUDA 13 builds >= 580.
TORCH_BUILDS = "TORCH=cu126 or cu128 for a driver >= 525 (cu128 also for Blackwell GPUs), TORCH=cu130 for >= 580"


def nvidia_smi(*args: str) -> subprocess.CompletedProcess[str] | None:
    """`nvidia-smi ARGS`, run; None when it is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess([exe, *args], 1, "", str(exc))


def nvidia_gpus() -> str | None:
    """What nvidia-smi says about this machine's NVIDIA GPUs, whatever torch sees; None without nvidia-smi or when it
    finds no GPU."""
    listing = nvidia_smi("-L")
    said = (listing.stdout + listing.stderr).strip() if listing is not None else ""
    if listing is None or "No devices were found" in said:
        return None
    if listing.returncode != 0:
        return f"nvidia-smi is installed but fails ({said.splitlines()[0] if said else f'exit {listing.returncode}'})"
    gpus = [line.strip() for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    if not gpus:
        return None
    header = nvidia_smi()
    found = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout if header is not None else "")
    driver = f"its driver runs CUDA up to {found.group(1)}" if found else "its driver's CUDA version is unknown"
    return f"nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) and {driver}"


def device_type(requested: Device) -> str:
    """'cuda' or 'cpu' for trainer.device. Never the CPU silently on a machine with NVIDIA GPUs: when torch sees none
    of them, a ConfigError says why and how to fix it (trainer.device=cpu insists on the CPU)."""
    if requested is Device.cpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    gpus = nvidia_gpus()
    if gpus is not None:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = f" CUDA_VISIBLE_DEVICES={hidden!r} decides which GPUs torch may use." if hidden is not None else ""
        raise ConfigError(
            f"trainer.device={requested.value!r}: {gpus}, but torch {torch.__version__} ({build}) sees no GPU."
            f"{visible} Install the torch build your driver runs: `make install {TORCH_BUILDS}` (a failing "
            "nvidia-smi needs its driver repaired first); or train on the CPU on purpose with trainer.device=cpu."
        )
    if requested is Device.cuda:
        raise ConfigError(
            "trainer.device='cuda' is not allowed: torch sees no GPU and nvidia-smi lists none; use "
            "trainer.device=cpu or auto"
        )
    return "cpu"


def check_device_options(trainer: TrainerConfig, kind: str, world_size: int) -> None:
    """Refuse what this job's device (`kind` from device_type) cannot run: fp16 on the CPU; CUDA graphs on the CPU,
    with several processes or with fp16."""
    on_cpu, fp16 = kind == "cpu", Precision(trainer.precision) is Precision.fp16
    require(not (on_cpu and fp16), "trainer.precision", "fp16", "fp16 needs CUDA; on CPU use fp32 (or bf16)")
    if trainer.cuda_graphs:
        require(not on_cpu, "trainer.cuda_graphs", True, "CUDA graphs need a GPU; use trainer.cuda_graphs=false")
        require(world_size == 1, "trainer.cuda_graphs", True, "one process only; with torchrun use false")
        require(not fp16, "trainer.cuda_graphs", True, "not with trainer.precision=fp16; use bf16")


def use_cuda_device(device: torch.device) -> torch.device:
    """Make `device` this process's current GPU and let cuDNN autotune its convolutions (the shapes never change,
    so each convolution's fastest algorithm is timed once, in the first iterations); returns `device`."""
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    return device


@contextlib.contextmanager
def job_device(kind: str, world_size: int, sweeping: bool) -> Iterator[torch.device]:
    """The device this process trains on (`kind` from device_type), current while the run lasts.

    The CPU; under torchrun the GPU of LOCAL_RANK; in a sweep a slot of the least-busy GPU (at most
    `$RESNET_REPRO_RUNS_PER_GPU` runs per GPU, gpu_slots.py), held until the run ends; else the current GPU.
    """
    if kind == "cpu":
        yield torch.device("cpu")
        return
    if world_size > 1 or not sweeping:
        index = int(os.environ.get("LOCAL_RANK", 0)) if world_size > 1 else torch.cuda.current_device()
        yield use_cuda_device(torch.device("cuda", index))
        return
    slot = acquire_gpu_slot(cuda_gpu_keys(), runs_per_gpu())
    try:
        yield use_cuda_device(torch.device("cuda", slot.index))
    finally:
        try:  # a launcher's worker is reused for later jobs, maybe on another GPU: give this one's cache back
            torch.cuda.empty_cache()
        finally:
            slot.release()


def init_distributed(device: torch.device) -> None:
    """torchrun's process group, as PyTorch documents it: on CUDA, NCCL bound to this rank's GPU (made current by
    job_device before), so no collective has to guess its device; gloo on the CPU."""
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def resolve_precision(requested: Precision, device: torch.device) -> Precision:
    """trainer.precision on `device`: `auto` is bf16 on CUDA, fp32 on the CPU."""
    if requested is not Precision.auto:
        return requested
    return Precision.bf16 if device.type == "cuda" else Precision.fp32


def resolve_channels_last(requested: bool | None, device: torch.device) -> bool:
    """trainer.channels_last on `device`: null is on for CUDA, off on the CPU."""
    return requested if requested is not None else device.type == "cuda"


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Does this CPU compute bf16 natively (x86 avx512_bf16 or amx_bf16)? Without it bf16 autocast is emulated and
    slower than fp32."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo.read_text()))
    except OSError:
        return False


def cpu_speed_overrides() -> list[str]:
    """The CPU profile's numerics, the fastest `make bench` measured (results/bench/bench-cpu*.md): with native bf16,
    bf16 autocast + channels_last trains ResNet-20/56 1.6x (a 2-core Zen 4) to 2.2x (a 2-core Xeon with AMX) faster
    than fp32; without it (a 2-core Zen 1, AVX2) bf16 is emulated and 5-14x slower, so fp32, where channels_last is
    12-13% faster than the default layout."""
    numerics = "trainer.precision=bf16" if cpu_has_native_bf16() else "trainer.precision=fp32"
    return [numerics, "trainer.channels_last=true"]
