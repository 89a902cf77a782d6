"""K runs per GPU: slot locks go to the least-busy GPU, are waited for when all are busy, and die with their job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from resnet_repro import gpu_slots
from resnet_repro.config import Device
from resnet_repro.engine import DistInfo
from resnet_repro.gpu_slots import acquire_gpu_slot
from resnet_repro.runs_per_gpu import RUNS_PER_GPU_ENV
from resnet_repro.train import job_device

GPUS = ["GPU-aaaa", "GPU-bbbb"]


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
    with job_device(Device.cpu, DistInfo(), sweeping=True) as device:
        assert device.type == "cpu"
    assert not (tmp_path / "slots").exists()


def test_a_sweep_job_trains_on_the_free_gpu_and_frees_it_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resnet_repro.train as train_module

    monkeypatch.setenv(gpu_slots.SLOT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "1")
    monkeypatch.setattr(train_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_module, "cuda_gpu_keys", lambda: list(GPUS))
    emptied: list[bool] = []
    monkeypatch.setattr(train_module.torch.cuda, "empty_cache", lambda: emptied.append(True))
    other_job = acquire_gpu_slot(GPUS, 1, tmp_path)  # holds GPU 0
    with job_device(Device.auto, DistInfo(), sweeping=True) as device:
        assert str(device) == "cuda:1"
        assert gpu_slots._try_acquire(GPUS, 1, tmp_path) is None
        assert not emptied
    assert emptied == [True]  # the reused worker hands its cached GPU memory back before the slot is free
    other_job.release()
    assert gpu_slots._try_acquire(GPUS, 1, tmp_path) is not None  # both free again (the probe's slot too)
