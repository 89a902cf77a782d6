"""What a run records about itself: environment/versions, TensorBoard scalars, a progress bar."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

GIT_SHA_ENV = "RESNET_REPRO_GIT_SHA"


def git_sha(cwd: Path | None = None) -> str | None:
    """The current commit of the source tree (with `-dirty` if modified); outside git (a copied tree, e.g. on a
    GPU machine the repository is sent to without .git) `$RESNET_REPRO_GIT_SHA` if set, else None."""
    fallback = os.environ.get(GIT_SHA_ENV) or None
    run = {"cwd": cwd or Path(__file__).resolve().parent, "capture_output": True, "text": True, "timeout": 5}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment_info(device: torch.device) -> dict:
    """Versions and machine facts recorded at the start of every run and in metrics.json; the device by name, e.g.
    'NVIDIA H100 80GB HBM3' or 'cpu (2 threads, x86_64)'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "device": name,
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
    }


def now_iso() -> str:
    """The current UTC time, ISO 8601, seconds precision."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


class ScalarLog:
    """TensorBoard scalars at global_step = iteration; a no-op on non-zero ranks."""

    def __init__(self, run_dir: Path, enabled: bool, start_iteration: int) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint, so curves never double; the
            # checkpoint's own iteration was logged before it was written and is not logged again: keep it (+1).
            self.writer = SummaryWriter(str(run_dir), purge_step=start_iteration + 1 if start_iteration else None)

    def add(self, iteration: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar over iterations (iteration, lr, loss, train err, img/s, ETA), or nothing. While it shows, log lines
    to the console print above the bar instead of into its line; close() gives the console its handler back."""

    def __init__(self, total: int, start: int, enabled: bool, description: str) -> None:
        self.bar = None
        self.console = contextlib.ExitStack()
        if enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.console.enter_context(logging_redirect_tqdm())
            self.bar = tqdm(total=total, initial=start, desc=description, unit="it", dynamic_ncols=True, leave=True)

    def update(self, iteration: int, **fields: str) -> None:
        """Move the bar to `iteration` and show `fields`."""
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix(fields, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.console.close()
