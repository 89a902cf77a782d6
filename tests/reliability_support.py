"""Helpers for the reliability tests (issue 7): tiny data, one canonical run, CLI/in-process/forked launches.

Costs on a 2-core CPU: a `python -m resnet_repro.train` subprocess pays ~5 s of imports before its first step,
so most runs here are in-process (`train()` with the config Hydra composes from the same overrides) or in a
forked child of the test process (real SIGKILL, no import cost); a few cases go through the real CLI.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fault_injection.sitecustomize as faults
import numpy as np
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import resnet_repro.train  # noqa: F401  (registers the schema and resolvers)
from resnet_repro.checkpoint import CHECKPOINT_NAME
from resnet_repro.config import TrainConfig
from resnet_repro.engine import DistInfo
from resnet_repro.train import train

CONFIGS = str(REPO / "configs")
N_TRAIN, N_TEST, BATCH = 120, 40, 8  # 15 iterations per epoch: epochs start at iterations 0, 15, 30, 45
ITERS_PER_EPOCH = N_TRAIN // BATCH
THREADS = 1  # every run here, in-process or not: same thread count, same floating-point reductions

# The canonical resumable run: ResNet-20, 60 iterations = 4 epochs, checkpoints every 10 iterations, an lr
# milestone at 45 and the paper's warm-up (short window, so it ends around iteration 20 and its state matters).
RESUME_OVERRIDES = [
    "data.batch_size=8", "optim.max_iter=60", "optim.milestones=[45]", "optim.warmup=true",
    "optim.warmup_window=5", "optim.warmup_max_iter=25", "trainer.log_every=5", "trainer.eval_every=30",
    "trainer.checkpoint_every=10",
]
COMMON = ["trainer.device=cpu", f"trainer.threads={THREADS}", "trainer.progress=false", "responses=false"]
# What a resumed run must restore exactly; `state_digest` hashes these (plus the iteration), never the timings.
DIGEST_KEYS = ("model", "optimizer", "scaler", "warmup", "rng")


def make_tiny_npz(sample_npz: Path, path: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """The first images of the real CIFAR-10 sample, in the npz format data=npz reads."""
    with np.load(sample_npz) as z:
        np.savez(path, x_train=z["x_train"][:n_train], y_train=z["y_train"][:n_train],
                 x_test=z["x_test"][:n_test], y_test=z["y_test"][:n_test])
    return path


def data_overrides(npz: Path) -> list[str]:
    """Data and machine overrides shared by every run here."""
    return ["data=npz", f"data.path={npz}", *COMMON]


def compose_config(overrides: list[str]) -> TrainConfig:
    """The TrainConfig `python -m resnet_repro.train OVERRIDES` would run (same files, same schema)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def pinned_threads() -> Iterator[None]:
    """Every test here computes with THREADS torch threads (as its runs do), then the session's count is back.
    One thread also keeps OpenMP from spin-waiting against other work on a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def in_process_entry() -> Iterator[None]:
    """Around an in-process call of the Hydra entry point: Hydra reconfigures the root logger for each job and
    `train()` sets torch's thread count; give the test session both back afterwards."""
    root = logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        torch.set_num_threads(threads)


def train_in_process(cfg: TrainConfig, run_dir: Path) -> dict:
    """`train()` in this process, restoring the test session's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        return train(cfg, run_dir, DistInfo())
    finally:
        torch.set_num_threads(threads)


def checkpoint_path(run_dir: Path) -> Path:
    """run_dir/checkpoints/last.pt"""
    return run_dir / "checkpoints" / CHECKPOINT_NAME


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration stored in run_dir's last.pt."""
    state = torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=True)
    return state["run_state"]["iteration"]


def temp_files(directory: Path) -> list[Path]:
    """Temp files of atomic writes (`.<name>.<random>.tmp`) in `directory`."""
    return sorted(directory.glob(".*.tmp")) if directory.is_dir() else []


def state_digest(state: Mapping[str, Any] | str | Path) -> str:
    """sha256 (hex) of a training state, independent of memory layout and device.

    Given a checkpoint (a dict with `model` and `run_state`, or the path of one), hashes the model's parameters
    and BN buffers, the optimizer state (momentum buffers, hyper-parameters), GradScaler, warm-up and RNG state
    and the iteration, but not wall times; two runs that end with equal digests are bit-identical where it
    matters. Any other mapping (e.g. `model.state_dict()`) is hashed whole.
    """
    if isinstance(state, (str, Path)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if "model" in state and "run_state" in state:
        state = {**{k: state[k] for k in DIGEST_KEYS if k in state}, "iteration": state["run_state"]["iteration"]}
    h = hashlib.sha256()
    _hash_into(h, state)
    return h.hexdigest()


def _hash_into(h, obj: Any) -> None:
    """Feed `obj` (tensors, mappings, sequences, plain values) into the hash `h`, its structure included."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode() + b":")
            _hash_into(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _hash_into(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def cli_env(fault: str | None = None) -> dict[str, str]:
    """Environment for a CLI subprocess: pinned threads, an optional fault (tests/fault_injection), no inherited
    fault."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    return faults.environment(fault, env)


def cli_command(args: list[str]) -> list[str]:
    """`python -m resnet_repro.train ARGS` with this interpreter."""
    return [sys.executable, "-m", "resnet_repro.train", *args]


def run_cli(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line to completion (or death); stdout and stderr merged into `.stdout`."""
    return subprocess.run(cli_command(args), cwd=REPO, env=cli_env(fault), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def run_forked(fn: Callable[[], object], timeout: float = 300) -> int:
    """Run `fn()` in a forked child (torch already imported: no start-up cost) and return its exit code,
    negative for a signal (-9 = SIGKILL), like subprocess. The child sets one thread before doing any work."""
    if torch.cuda.is_initialized():  # a forked child cannot use CUDA; the tests here are CPU-only anyway
        raise RuntimeError("run_forked needs a process that has not initialised CUDA")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            torch.set_num_threads(THREADS)
            fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"forked child {pid} still running after {timeout} s")
        time.sleep(0.02)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root` -> (mtime_ns, size, content): to prove a directory was left untouched."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


_REFERENCE: dict[str, object] = {}


def reference_run(tmp_path_factory, sample_npz: Path) -> dict[str, object]:
    """The uninterrupted canonical run (once per session): its digest, config, npz and a copy of every checkpoint.

    Returns {"npz", "overrides" (CLI, without the run dir), "cfg", "run_dir", "digest", "snapshots" (iteration ->
    path of the checkpoint written then)}.
    """
    if not _REFERENCE:
        import resnet_repro.engine as engine

        root = tmp_path_factory.mktemp("reference")
        npz = make_tiny_npz(sample_npz, root / "tiny.npz")
        overrides = [*data_overrides(npz), *RESUME_OVERRIDES]
        cfg = compose_config(overrides)
        run_dir, snapshots_dir = root / "run", root / "snapshots"
        snapshots_dir.mkdir()
        snapshots: dict[int, Path] = {}
        original = engine.save_checkpoint

        def save_and_copy(path: Path, state: dict) -> None:
            original(path, state)
            iteration = state["run_state"]["iteration"]
            snapshots[iteration] = Path(shutil.copy(path, snapshots_dir / f"last-{iteration}.pt"))

        engine.save_checkpoint = save_and_copy
        try:
            train_in_process(cfg, run_dir)
        finally:
            engine.save_checkpoint = original
        _REFERENCE.update(npz=npz, overrides=overrides, cfg=cfg, run_dir=run_dir,
                          digest=state_digest(checkpoint_path(run_dir)), snapshots=snapshots)
    return _REFERENCE


def curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The run's TensorBoard curves as the plots read them (results.read_curves: all event files, later ones
    purging what a killed run logged after its last checkpoint), minus the timing tag that never repeats."""
    from resnet_repro.results import read_curves

    return {tag: (steps.tolist(), values.tolist()) for tag, (steps, values) in read_curves(run_dir).items()
            if tag != "perf/img_per_s"}


def after_the_last_event_file(run_dir: Path) -> None:
    """Wait until the wall-clock second is later than the newest event file's: TensorBoard orders event files by
    name (start time in whole seconds, then host and pid), so a restart within the same second could sort first.
    Real restarts take seconds; forked ones here do not."""
    stamps = [int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*")]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


class PoisonLogits:
    """Forward hook on the classifier: NaN logits on the training-mode calls listed (0-based call count)."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def __call__(self, module, inputs, output):
        if not module.training:
            return None
        self.count += 1
        return output * float("nan") if self.count - 1 in self.calls else None


def ddp_worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    """One gloo rank of `torch.multiprocessing.spawn`; runs each job {cfg, run_dir, nan_on: (rank, iteration) or
    None, fault_on: (rank, spec) or None} in turn and writes what happened to <run_dir>.rank<r>.txt."""
    import resnet_repro.train as train_module
    from resnet_repro.engine import NonFiniteError
    from resnet_repro.models import build_model
    from resnet_repro.run_dir import Preempted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for job in jobs:
            nan_rank, nan_iteration = job.get("nan_on") or (None, None)

            def model_for_this_rank(*args, _poison=rank == nan_rank, _at=nan_iteration, **kwargs):
                model = build_model(*args, **kwargs)
                if _poison:
                    model.fc.register_forward_hook(PoisonLogits({_at}))
                return model

            train_module.build_model = model_for_this_rank
            fault_rank, spec = job.get("fault_on") or (None, None)
            try:
                with faults.inject(spec if rank == fault_rank else None):
                    train(job["cfg"], Path(job["run_dir"]), DistInfo(rank=rank, world_size=world_size))
                outcome = "finished"
            except (NonFiniteError, Preempted) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            Path(f"{job['run_dir']}.rank{rank}.txt").write_text(outcome)
        leave_together()
    finally:
        torch.distributed.destroy_process_group()


def leave_together() -> None:
    """Wait for every rank before tearing the group down: rank 0 hosts the TCPStore, and a rank still talking to it
    when rank 0 exits can abort in gloo's teardown ("terminate called without an active exception", seen once in a
    full-suite run). A rank that never arrives fails the barrier after 60 s instead of hanging the test."""
    torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))


def spawn_ddp(jobs: list[dict], world_size: int = 2, timeout: float = 240) -> list[list[str]]:
    """Run `jobs` on `world_size` gloo ranks (CPU); per job, each rank's outcome. A rank stuck in a collective
    fails the test after `timeout` seconds instead of hanging it."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(ddp_worker, args=(world_size, port, jobs), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"a DDP rank was still running after {timeout} s (stuck in a collective?)")
    return [[Path(f"{job['run_dir']}.rank{r}.txt").read_text() for r in range(world_size)] for job in jobs]
