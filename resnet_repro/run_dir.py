"""One training process per run directory: an exclusive `flock` on `<run dir>/.train.lock`, held while it trains.

Two processes writing one run directory would interleave checkpoints and curves, and the second would delete the
first's in-flight temp files at its start. That happens when a sweep is relaunched while jobs of the first launch
still run (a launcher's workers orphaned by a killed driver, a Slurm job array left running). The lock is released
by the kernel when the holder exits, `kill -9` included, so a stale lock cannot block a resume. The file holds the
holder's host, pid and start time for the message of whoever finds it taken; it is never deleted (deleting a lock
file races with its next holder). On NFS, Linux maps `flock` to NFS byte-range locks, which hold across hosts.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from resnet_repro.tracking import now_iso

LOCK_NAME = ".train.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process is training this run directory."""


@dataclass
class RunLock:
    """The held lock of one run directory, its locked file; `release()` (or process exit) frees it."""

    handle: IO[str]

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


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


def hold_run_directory(run_dir: Path) -> RunLock:
    """Take `run_dir`'s lock without waiting; raises RunDirectoryBusy naming the holder if it is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryBusy(
            f"{run_dir} is being trained by {holder}; not touching it. Stop that process, or wait for it: "
            "rerunning the command after it ends resumes or skips this run"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
    handle.flush()
    return RunLock(handle)
