"""K runs per GPU: K is a setting (default 1), the local launcher runs GPUs x K jobs, slot locks go to the least-busy
GPU, are waited for when all are busy, and die with their job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import resnet_repro.device as device_module
from resnet_repro import gpu_slots
from resnet_repro.device import job_device
from resnet_repro.errors import ConfigError
from resnet_repro.gpu_slots import RUNS_PER_GPU_ENV, acquire_gpu_slot, local_jobs, runs_per_gpu

GPUS = ["GPU-aaaa", "GPU-bbbb"]


def test_k_is_one_unless_set_and_must_be_a_positive_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    assert runs_per_gpu() == 1
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "3")
    assert runs_per_gpu() == 3 and runs_per_gpu("2") == 2
    for bad in ("0", "-1", "auto", "1.5", ""):
        with pytest.raises(ConfigError, match=rf"{RUNS_PER_GPU_ENV}='{bad}' is not valid: a positive integer"):
            runs_per_gpu(bad)


def test_the_local_launcher_runs_gpus_times_k_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_jobs(1) == 4 and local_jobs("2") == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_jobs(3) == 1  # no GPU: one run at a time
    with pytest.raises(ConfigError, match=RUNS_PER_GPU_ENV):
        local_jobs("auto")  # a bad value is an error without a GPU too


def test_reproduce_checks_k_once_before_its_launchers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from resnet_repro import reproduce

    launched: list[reproduce.Step] = []

    def launch(steps: list[reproduce.Step], *_: object) -> list[int]:
        launched.extend(steps)
        return [0] * len(steps)

    monkeypatch.setattr(reproduce, "run_steps", launch)
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "auto")  # the measured K of earlier versions
    args = ["--profile", "quick", "--data", "x.npz", "--launcher", "local", "--results-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match=f"{RUNS_PER_GPU_ENV}='auto' is not valid"):
        reproduce.main(args)
    assert not launched


def test_the_trainer_does_not_import_the_benchmark() -> None:
    code = "import sys, resnet_repro.train; print(sorted(m for m in sys.modules if m.startswith('resnet_repro.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_slots_fill_the_least_busy_gpu_first(tmp_path: Path) -> None:
    held = [acquire_gpu_slot(GPUS, 2, tmp_path) for _ in range(4)]
    assert [h.index for h in held] == [0, 1, 0, 1]
    assert sorted((h.index, h.slot) for h in held) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert gpu_slots._try_acquire(GPUS, 2, tmp_path) is None  # all four busy
    held[3].release()  # GPU 1 now has a free slot and GPU 0 none
    again = acquire_gpu_slot(GPUS, 2, tmp_path)
    assert (again.index, again.slot) == (1, 1)
    for h in [*held, again]:
        h.release()


def test_a_job_waits_for_a_busy_gpu_instead_of_oversubscribing(tmp_path: Path) -> None:
    first = acquire_gpu_slot(GPUS[:1], 1, tmp_path)
    got: list[gpu_slots.GpuSlot] = []
    waiter = threading.Thread(target=lambda: got.append(acquire_gpu_slot(GPUS[:1], 1, tmp_path, poll_s=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert not got, "a second run took the only slot while the first still held it"
    first.release()
    waiter.join(timeout=10)
    assert got and got[0].index == 0
    got[0].release()


def test_a_killed_job_frees_its_slot(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from resnet_repro.gpu_slots import acquire_gpu_slot\n"
        f"slot = acquire_gpu_slot({GPUS[:1]!r}, 1, Path({str(tmp_path)!r}))\n"
        "print('held', slot.index, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().split() == ["held", "0"]
        assert gpu_slots._try_acquire(GPUS[:1], 1, tmp_path) is None
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        slot = acquire_gpu_slot(GPUS[:1], 1, tmp_path, poll_s=0.02)
        assert slot.index == 0
        slot.release()
    finally:
        child.kill()
        child.wait()


def test_slots_of_one_gpu_are_shared_across_processes_by_uuid(tmp_path: Path) -> None:
    """Another process lists the same physical GPU at another index: it still counts against that GPU."""
    mine = acquire_gpu_slot(["GPU-aaaa"], 1, tmp_path)
    assert gpu_slots._try_acquire(["GPU-bbbb", "GPU-aaaa"], 1, tmp_path).index == 0  # only bbbb is free
    mine.release()


def test_cpu_jobs_take_no_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpu_slots.SLOT_DIR_ENV, str(tmp_path / "slots"))
    with job_device("cpu", 1, sweeping=True) as device:
        assert device.type == "cpu"
    assert not (tmp_path / "slots").exists()


def test_a_sweep_job_trains_on_the_free_gpu_and_frees_it_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv(gpu_slots.SLOT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "1")
    monkeypatch.setattr(device_module, "cuda_gpu_keys", lambda: list(GPUS))
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    other_job = acquire_gpu_slot(GPUS, 1, tmp_path)  # holds GPU 0
    with job_device("cuda", 1, sweeping=True) as device:
        assert str(device) == "cuda:1" and current == [device]
        assert gpu_slots._try_acquire(GPUS, 1, tmp_path) is None
        assert not emptied
    assert emptied == [True]  # the reused worker hands its cached GPU memory back before the slot is free
    other_job.release()
    assert gpu_slots._try_acquire(GPUS, 1, tmp_path) is not None  # both free again (the probe's slot too)
