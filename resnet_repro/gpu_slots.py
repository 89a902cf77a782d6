"""Several runs per GPU in a local sweep: K, the launcher's job count, and the slot each job holds while it trains.

K is `$RESNET_REPRO_RUNS_PER_GPU` (default 1; `make bench`'s K table measures what more would gain on a GPU).
The local launcher (configs/hydra/launcher/local.yaml) runs visible GPUs x K jobs at once (`local_jobs`); each
job takes, under one machine-wide chooser lock, a free slot of the GPU with the fewest slots held and keeps it
until its run ends, so a GPU whose short runs finished gets the next job, and a job that finds every slot busy
waits. Slots are `flock` locks on files named by the GPU's UUID in `$RESNET_REPRO_SLOT_DIR` (default: one folder
per user in the system temp folder): a job that dies, even by `kill -9`, releases its slot, and separate sweeps on
one machine never put more than K runs on one GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from resnet_repro.errors import ConfigError

log = logging.getLogger(__name__)

RUNS_PER_GPU_ENV = "RESNET_REPRO_RUNS_PER_GPU"
SLOT_DIR_ENV = "RESNET_REPRO_SLOT_DIR"
CHOOSER_NAME = "choose.lock"
WAIT_LOG_EVERY_S = 60.0


def runs_per_gpu(raw: str | int | None = None) -> int:
    """K: `raw`, else `$RESNET_REPRO_RUNS_PER_GPU`, else 1; a ConfigError naming the variable unless a positive
    integer."""
    raw = os.environ.get(RUNS_PER_GPU_ENV, "1") if raw is None else raw
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(
            f"{RUNS_PER_GPU_ENV}={raw!r} is not valid: a positive integer, the runs a local sweep trains at once on "
            "each GPU (default 1; `make bench` measures what a higher K gains on your GPU)"
        )
    return k


def local_jobs(raw: str | int | None = None) -> int:
    """The local launcher's `n_jobs`: visible GPUs x K, or 1 on a machine without a GPU (runs in turn)."""
    import torch

    k = runs_per_gpu(raw)  # a bad value is an error on a machine without a GPU too
    return torch.cuda.device_count() * k if torch.cuda.is_available() else 1


@dataclass
class GpuSlot:
    """A held slot: the GPU's index in this process's device list, its key, and the locked file."""

    index: int
    key: str
    slot: int
    handle: IO[bytes]

    def release(self) -> None:
        """Unlock and close the slot file (idempotent)."""
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _lock_free_slots(slot_dir: Path, key: str, runs_per_gpu: int) -> list[tuple[int, IO[bytes]]]:
    """The slots of the GPU `key` that no process holds, each with its lock file opened and locked without waiting."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)  # a file-safe name
    free = []
    for slot in range(runs_per_gpu):
        handle = open(slot_dir / f"{safe}.slot{slot}.lock", "ab")  # noqa: SIM115 - the handle is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free.append((slot, handle))
        except BlockingIOError:
            handle.close()
    return free


def _try_acquire(gpu_keys: Sequence[str], runs_per_gpu: int, slot_dir: Path) -> GpuSlot | None:
    """One pass under the chooser lock: a free slot of the GPU with the most free slots (ties: the lowest index)."""
    with open(slot_dir / CHOOSER_NAME, "ab") as chooser:  # closing it releases the lock
        fcntl.flock(chooser, fcntl.LOCK_EX)  # slot choice, serialised among all jobs of the machine
        free = [_lock_free_slots(slot_dir, key, runs_per_gpu) for key in gpu_keys]
        best = max(range(len(free)), key=lambda index: (len(free[index]), -index), default=None)
        held = None
        if best is not None and free[best]:
            slot, handle = free[best].pop(0)
            held = GpuSlot(best, gpu_keys[best], slot, handle)
        for handles in free:
            for _, handle in handles:
                handle.close()  # and with it the lock
        return held


def acquire_gpu_slot(
    gpu_keys: Sequence[str], runs_per_gpu: int, slot_dir: Path | None = None, poll_s: float = 1.0
) -> GpuSlot:
    """Block until a slot is free; take one on the GPU with the most free slots (ties: the lowest index). The slot
    folder is `$RESNET_REPRO_SLOT_DIR`, or this user's in the system temp directory (shared by all their jobs)."""
    tmp = Path(tempfile.gettempdir()) / f"resnet_repro-gpu-slots-{os.getuid()}"
    slot_dir = slot_dir or Path(os.environ.get(SLOT_DIR_ENV) or tmp)
    slot_dir.mkdir(parents=True, exist_ok=True)
    started = next_log = time.monotonic()
    while (held := _try_acquire(gpu_keys, runs_per_gpu, slot_dir)) is None:
        if time.monotonic() >= next_log:
            waited = time.monotonic() - started
            log.info(
                "all %d x %d GPU slots in %s are busy; waited %.0f s", len(gpu_keys), runs_per_gpu, slot_dir, waited
            )
            next_log += WAIT_LOG_EVERY_S
        time.sleep(poll_s)
    log.info("GPU %d (%s): slot %d of %d taken", held.index, held.key, held.slot + 1, runs_per_gpu)
    return held


def cuda_gpu_keys() -> list[str]:
    """A stable key per visible CUDA device: its UUID (the same GPU has the same key in every process)."""
    import torch

    uuids = [getattr(torch.cuda.get_device_properties(i), "uuid", None) for i in range(torch.cuda.device_count())]
    return [f"cuda{i}" if uuid is None else f"GPU-{uuid}" for i, uuid in enumerate(uuids)]
