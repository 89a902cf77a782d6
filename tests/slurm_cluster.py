"""A private single-node Slurm for the test session (issue 17): Debian's slurmctld, slurmd and munged, run as root
in the foreground, with their own slurm.conf, state, spool, logs, munge key and socket in temporary directories
and free ports, so they clash with no system Slurm and no other test session. `python tests/slurm_cluster.py`
(as root) starts one outside the tests, to try the Slurm path by hand (README), until Ctrl-C.

The cluster: one node `localhost` with CPUs=2, select/cons_tres, proctrack/linuxproc (no cgroups), SlurmUser root,
accounting off (as on any one-machine Slurm; resnet_repro.sweep has submitit read squeue then), and
`cred_expire=5`: Slurm holds a requeued job for cred_expire seconds before it may start again (default 120 s).
munged insists that every directory above its socket be searchable by all, which pytest's temporary directories
are not: its key and socket go to a directory of their own in the system's temporary directory (removed by `stop`).

`SlurmCluster.start()` waits until `sinfo` shows the node idle; `stop()` cancels every job, stops every daemon it
started (SIGTERM, then SIGKILL) and ends any job process left, found by this cluster's SLURM_CONF in its
environment. The daemons get SIGTERM if the test process dies, and run at nice 19 (their jobs inherit it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "apt-get install -y slurmctld slurmd slurm-client munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
NODE = "localhost"
NODE_CPUS = 2
NODE_MEMORY_MB = 4096  # RealMemory: a job's --mem must fit; no more than this machine has (checked in missing())
CRED_EXPIRE_S = 5
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")  # fmt: skip


def which(name: str) -> str | None:
    """Path of a Slurm or munge binary (the daemons are in /usr/sbin, maybe not on a user's PATH)."""
    return shutil.which(name, path=SEARCH_PATH)


def missing() -> str | None:
    """Why no cluster can be started here (not root, binaries or memory missing), or None."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if which(name) is None]
    if absent:
        return f"{', '.join(absent)} not found; install them (as root) with: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return f"the private Slurm cluster runs its daemons as root (SlurmUser=root); this is uid {os.geteuid()}"
    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") < NODE_MEMORY_MB * 2**20:
        return f"the test node declares RealMemory={NODE_MEMORY_MB} MB, more than this machine has"
    return None


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nobody listens on now (bound to port 0, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _daemon_preexec(nice: int) -> None:
    """In the daemon's process before exec: at least `nice`, and SIGTERM when its parent (the test process) dies."""
    os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class SlurmCluster:
    """One controller and one node on this machine, configured under `root`; daemons and jobs at nice `nice`."""

    def __init__(self, root: Path, nice: int = 19) -> None:
        self.root = root
        self.nice = nice
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.munge_dir = Path(tempfile.mkdtemp(prefix="resnet_repro-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- set-up -------------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        """slurm.conf, the munge key and the directories (munged wants its socket directory searchable by all)."""
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, slurmd_port = free_ports(2)
        r = self.root
        self.conf.write_text(
            f"""# private single-node cluster of the resnet_repro test session (tests/slurm_cluster.py)
ClusterName=resnetrepro
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2
NodeName={NODE} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 - the daemon's stdout/stderr while it runs
        try:
            self.procs[name] = subprocess.Popen(
                [which(name) or name, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.root, preexec_fn=functools.partial(_daemon_preexec, self.nice),
            )  # fmt: skip
        finally:
            out.close()

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd in the foreground; return once the node is idle (else stop, raise)."""
        self.write_config()
        r = self.munge_dir
        try:
            self._spawn("munged", ["--foreground", f"--socket={self.munge_socket}", f"--key-file={r}/munge.key",
                                   f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed"])  # fmt: skip
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
            self._spawn("slurmctld", ["-D", "-i"])
            self._spawn("slurmd", ["-D", "-N", NODE])
            self._wait(lambda: self.node_state() == "idle", timeout, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [f"{n} exited {p.returncode}" for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = ", ".join(dead) or f"{timeout:.0f} s passed"
                raise RuntimeError(f"private Slurm: waiting for {what}, but {why}\n{self.log_tail()}")
            time.sleep(0.2)

    # -- use ------------------------------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A client command (sinfo, squeue, scontrol, scancel ...) against this cluster; its stdout."""
        proc = subprocess.run([which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def node_state(self) -> str:
        """The node's state as sinfo prints it (idle, mixed, alloc, down* ...), or '' when it cannot be asked."""
        try:
            return self.run("sinfo", "--noheader", "--format=%T", check=False, timeout=10).strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def jobs(self) -> list[str]:
        """'<job id> <state>' of every job the controller holds."""
        return self.run("squeue", "--noheader", "--array", "--states=all", "--format=%i %T").split("\n")[:-1]

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for a failure message."""
        parts = []
        for path in sorted(self.logs.glob("*")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    # -- tear-down ------------------------------------------------------------------------------------------------
    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait (up to `timeout` s) until none is left running or pending."""
        self.run("scancel", f"--user={os.getuid()}", check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(not line.endswith(ENDED) for line in self.jobs()):
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, stop every daemon started here, end any process left of this cluster's jobs."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.cancel_all()
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged (they authenticate through it)
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for pid in self.job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def job_processes(self) -> list[int]:
        """Processes other than this one and the daemons whose environment names this cluster's slurm.conf: what
        is left of its jobs (slurmstepd's children inherit the job's SLURM_CONF)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        skip = {os.getpid(), *(p.pid for p in self.procs.values())}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            with contextlib.suppress(OSError):
                if mine in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        return found


def main() -> None:
    """`python tests/slurm_cluster.py [DIR]` (as root): start the cluster, say how to use it, stop it on Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description="A private single-node Slurm on this machine (until Ctrl-C).")
    parser.add_argument("dir", nargs="?", help="where its config, state and logs go (default: new, under /tmp)")
    args = parser.parse_args()
    why = missing()
    if why:
        sys.exit(f"cannot start a Slurm here: {why}")
    cluster = SlurmCluster(Path(args.dir or tempfile.mkdtemp(prefix="resnet_repro-slurm-")).resolve(), nice=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on Ctrl-C
    try:
        cluster.start()
        print(f"Slurm is up: one node, {NODE_CPUS} CPUs, {NODE_MEMORY_MB} MB; logs in {cluster.logs}\n"
              f"In another shell:  export SLURM_CONF={cluster.conf}; sinfo\n"
              "Ctrl-C cancels its jobs and stops it.", flush=True)  # fmt: skip
        while all(proc.poll() is None for proc in cluster.procs.values()):
            time.sleep(1)
        sys.exit(f"a Slurm daemon exited:\n{cluster.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
