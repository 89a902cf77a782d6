"""The run directory: its name, the names of its files, who may write it, and what a job leaves in it
(`own_run_directory` wraps one training job).

A finished run (metrics.json) is skipped; one training process per directory holds an exclusive `flock` on
`<run dir>/.train.lock` while it trains; a failure leaves failed.json; the exit codes say which of these happened.

Two processes writing one run directory would interleave checkpoints and curves, and the second would delete the
first's in-flight temp files at its start. That happens when a sweep is relaunched while jobs of the first launch
still run (a launcher's workers orphaned by a killed driver, a Slurm job array left running). The lock is released
by the kernel when the holder exits, `kill -9` included, so a stale lock cannot block a resume. The file holds the
holder's host, pid and start time for the message of whoever finds it taken; it is never deleted (deleting a lock
file races with its next holder). On NFS, Linux maps `flock` to NFS byte-range locks, which hold across hosts.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from resnet_repro.errors import ConfigError

log = logging.getLogger("resnet_repro.train")

EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2  # the command line or config is wrong (Hydra's own rejections too, via `train.cli`); nothing ran
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1/SIGUSR2: checkpoint written; rerun the same command to resume
EXIT_BUSY = 5  # another process is training this run directory; nothing was written into it
METRICS_NAME = "metrics.json"  # a finished run: written last and atomically; a rerun skips the run
FAILED_NAME = "failed.json"  # a failed run: the error and its traceback
SUMMARY_JSON = "sweep_summary.json"  # a sweep directory: what became of each planned run (written at the end)
PLAN_JSON = "sweep_plan.json"  # a sweep directory: the planned run directories (written at the start)
SUMMARY_LOG = "sweeps.log"  # a sweep directory: every summary, appended
LOCK_NAME = ".train.lock"  # held while a process trains the run
NAME_MAX_BYTES = 255  # the longest file name Linux file systems accept


class RunDirectoryBusy(RuntimeError):
    """Another live process is training this run directory."""


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1/SIGUSR2 arrived; a checkpoint was written at a step boundary."""


def slugify(text: str) -> str:
    """Directory name for a data label: 'CIFAR-10 sample (5,085 train / 1,017 test)' -> 'cifar-10-sample-5085-...'."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "data"


def data_dir_name(source: str | Enum, path: str | None, label: str | None) -> str:
    """The data's directory level, runs/<this>/<experiment>/<run>: runs on different data never share a run directory
    (a finished sample run must not make a full-data run skip). The slug of data.label if set, else of the npz file's
    name, else 'cifar-10' (torchvision's download)."""
    source = getattr(source, "value", source)
    if label:
        return slugify(label)
    if source == "npz" and path:
        return slugify(Path(path).stem)
    return slugify("CIFAR-10")


def run_name(override_dirname: str) -> str:
    """Run directory name from the command-line overrides ('default' when there are none). A name too long for a
    file name is cut and ends in a hash of the whole, so different overrides still name different directories."""
    name = override_dirname.replace("/", "_") or "default"
    if len(name.encode()) <= NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name.encode()[: NAME_MAX_BYTES - len(digest) - 1].decode(errors='ignore')}-{digest}"


def hands_off(run_dir: Path) -> bool:
    """Is the run directory finished, or being trained by another process? Then this job must not write into it."""
    return (run_dir / METRICS_NAME).exists() or holder(run_dir) is not None


def hydra_subdir(output_dir: str) -> str | None:
    """`hydra.output_subdir`: `.hydra`, or None (Hydra saves nothing) for a finished or busy run, left untouched."""
    return None if hands_off(Path(output_dir)) else ".hydra"


def run_log(output_dir: str) -> str:
    """The job's log file: `train.log` in the run directory, or os.devnull for a finished or busy run."""
    return os.devnull if hands_off(Path(output_dir)) else str(Path(output_dir) / "train.log")


def holder(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock right now (the lock file's text), or None when nobody does, as far as this host
    can tell: read from the kernel's lock table (/proc/locks), so looking takes no lock and cannot make a
    concurrent `hold_run_directory` fail. A holder on another NFS client, or a system without /proc/locks, is not
    seen (None); `hold_run_directory` still refuses it."""
    path = run_dir / LOCK_NAME
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and inode in fields:
            try:
                return path.read_text().strip() or "another process"
            except OSError:
                return "another process"
    return None


def hold_run_directory(run_dir: Path) -> Callable[[], None]:
    """Take `run_dir`'s lock without waiting and return the function that releases it (process exit does too);
    raises RunDirectoryBusy naming the holder if it is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        taken_by = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryBusy(
            f"{run_dir} is being trained by {taken_by}; not touching it. Stop that process, or wait for it: "
            "rerunning the command after it ends resumes or skips this run"
        ) from None
    from resnet_repro.tracking import now_iso  # here, not at the top: reproduce and plot import this module, torch-free

    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
    handle.flush()
    return handle.close  # closing the file releases its flock


def finished(run_dir: Path) -> bool:
    """Does `run_dir` hold metrics.json? Then the run is finished, and this job skips it (logged)."""
    if not (run_dir / METRICS_NAME).exists():
        return False
    log.info("skipped: %s exists (the run is finished; delete it to train again)", run_dir / METRICS_NAME)
    return True


def own_run_directory(train: Callable[[], object], run_dir: Path, rank: int, world_size: int, sweeping: bool) -> str:
    """Run `train` as the one owner of `run_dir`; returns 'finished', 'skipped', 'busy' or 'failed'.

    Outside a sweep, 'busy' and 'failed' exit the process instead (EXIT_BUSY, EXIT_CONFIG_ERROR for a config error,
    EXIT_FAILED otherwise); in a sweep a failure never raises, so the other runs go on. Preempted always exits
    EXIT_PREEMPTED: the whole process (a basic-launcher sweep too) stops to be requeued. Only rank 0 locks and writes.
    """
    if finished(run_dir):  # before the lock, which would add its file to a finished run's directory
        return "skipped"
    try:
        release = hold_run_directory(run_dir) if rank == 0 else None
    except RunDirectoryBusy as exc:  # the other process owns the directory: record nothing in it
        log.error("run directory busy: %s", exc)
        return "busy" if sweeping else sys.exit(EXIT_BUSY)
    try:
        if world_size == 1 and finished(run_dir):  # finished by the last holder just now (not under DDP: a rank
            return "skipped"  # skipping alone would leave the others waiting for it)
        if rank == 0:
            (run_dir / FAILED_NAME).unlink(missing_ok=True)
        train()
        return "finished"
    except Preempted as exc:
        log.warning("preempted: %s", exc)
        sys.exit(EXIT_PREEMPTED)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded; a sweep goes on
        return _failed(exc, run_dir, rank, sweeping)
    finally:
        if release is not None:
            release()


def _failed(exc: Exception, run_dir: Path, rank: int, sweeping: bool) -> str:
    """Record a failed run: failed.json (the error, the date, the traceback) and the log; in a sweep return
    'failed', else exit EXIT_CONFIG_ERROR for a config error, EXIT_FAILED for anything else."""
    from resnet_repro.checkpoint import atomic_write_json  # imports torch: here (see hold_run_directory)
    from resnet_repro.tracking import now_iso

    if rank == 0:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = f"{type(exc).__name__}: {exc}"
        atomic_write_json(
            run_dir / FAILED_NAME, {"status": "failed", "error": error, "date": now_iso(), "traceback": trace}
        )
    config_error = isinstance(exc, (ConfigError, OmegaConfBaseException))
    if config_error:
        log.error("config error: %s", exc)
    else:
        log.error("run failed: %s: %s (details in %s)", type(exc).__name__, exc, run_dir / FAILED_NAME)
    if sweeping:
        return "failed"
    sys.exit(EXIT_CONFIG_ERROR if config_error else EXIT_FAILED)
