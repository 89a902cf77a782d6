"""The training loop: one counter of iterations, the paper's schedule, periodic evaluation, checkpoints.

`fit()` takes plain arguments (no Hydra). Inside the step loop nothing waits for the device except at
logging/evaluation/checkpoint intervals and during the warm-up (whose switch depends on every minibatch's
error); losses, errors and the non-finite check are accumulated on the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from resnet_repro.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_json,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from resnet_repro.data import DeviceData
from resnet_repro.optim import Schedule
from resnet_repro.run_files import METRICS_NAME
from resnet_repro.step import Accumulators, TrainStep, make_iteration, match_parameter_layouts
from resnet_repro.tracking import Progress, ScalarLog, now_iso

log = logging.getLogger(__name__)

EVAL_PRECISION = "fp32"  # test/val errors and Figure-7 responses: always fp32 (metrics.json says so)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the update of that iteration was not applied."""


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1/SIGUSR2 arrived; a checkpoint was written at a step boundary."""


class NotRequeued(RuntimeError):
    """SIGUSR2 arrived under submitit, the checkpoint was written, and submitit would not requeue the job (it had
    timed out too often): the run is recorded as failed; rerunning the sweep resumes it from the checkpoint."""


@dataclass
class LoopOptions:
    """How long and how often: everything `fit` needs besides the objects it trains."""

    max_iter: int
    batch_size: int  # global batch, all ranks together
    eval_batch_size: int = 1000
    log_every: int = 100
    eval_every: int = 2000
    checkpoint_every: int = 2000
    precision: str = "fp32"  # fp32 | bf16 | fp16
    cuda_graphs: bool = False  # GraphedIteration: captured on CUDA (eager if that fails), its body elsewhere (tests)
    progress: bool = True
    compute_responses: bool = True
    description: str = "train"


@dataclass
class DistInfo:
    """Rank and world size of this process (1 process = rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, split: str, batch_size: int) -> tuple[float, float]:
    """(error %, mean loss) of `model` in eval mode over the whole `split` ('test' or 'val'), in fp32 whatever the
    training precision (EVAL_PRECISION): a reported error must not depend on the arithmetic a run trained in."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=data.device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)
    count = 0
    for images, labels in data.eval_batches(split, batch_size):
        with torch.autocast(data.device.type, enabled=False):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        wrong += (logits.argmax(dim=1) != labels).sum()
        count += len(labels)
    model.train(was_training)
    return 100.0 * wrong.item() / count, loss_sum.item() / count


class StopSignal:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag checked at step boundaries (Slurm preemption and time limits;
    SIGUSR2 is what hydra-submitit-launcher's jobs are sent before their time limit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def pass_on(self) -> None:
        """After the checkpoint: if SIGUSR2 arrived and a Python handler had it before us, call that handler.
        Under submitit it requeues the Slurm job and exits, now without losing iterations. Other signals, and
        default or ignored handlers, are left alone (the run then stops with Preempted)."""
        previous = self._previous.get(signal.SIGUSR2)
        if self.received == signal.SIGUSR2 and callable(previous):
            previous(self.received, None)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunState:
    """Everything besides model/optimizer that a resumed run must continue from."""

    iteration: int = 0
    elapsed_s: float = 0.0
    train_time_s: float = 0.0
    best_val_err: float | None = None
    best_val_iter: int | None = None
    last: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain-data state for checkpoints."""
        return dict(self.__dict__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _all_reduce(value: float, device: torch.device, dist_info: DistInfo, how: str) -> float:
    """`how` = 'max' or 'mean' of a float over all ranks (identity with one process)."""
    if dist_info.world_size == 1:
        return value
    t = torch.tensor(value, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
    return t.item() if how == "max" else t.item() / dist_info.world_size


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    data: DeviceData,
    run_dir: Path,
    options: LoopOptions,
    fingerprint: str,
    run_info: dict[str, Any],
    dist_info: DistInfo | None = None,
    identity: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train to `options.max_iter`, resuming from run_dir/checkpoints/last.pt if present; return metrics.

    `model` may be wrapped (DDP, torch.compile). `run_info` (arch, depth, config, versions, ...) is copied into
    metrics.json, which rank 0 writes last and atomically. `fingerprint` (the config's) and `identity` (the data's
    hash, the training precision) are stored in every checkpoint; a resume must match both.
    """
    identity = identity or {}
    dist_info = dist_info or DistInfo()
    device = data.device
    plain_model = unwrap(model)
    ckpt_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    state = RunState()
    step = TrainStep(model, optimizer, options.precision, device)
    saved: dict[str, Any] = {}
    if ckpt_path.exists():
        saved = load_checkpoint(ckpt_path, fingerprint, plain_model, identity)
        plain_model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        match_parameter_layouts(optimizer)
        if step.scaler is not None and saved.get("scaler"):
            step.scaler.load_state_dict(saved["scaler"])
        if schedule.warmup is not None:
            schedule.warmup.load_state_dict(saved["warmup"])
        restore_rng_state(saved["rng"], device)
        state = RunState(**saved["run_state"])
        log.info("resumed from %s at iteration %d", ckpt_path, state.iteration)
    acc = Accumulators.zeros(device, state.iteration)
    if "interval" in saved and dist_info.is_main:  # all ranks' sums since the last log point, kept by rank 0
        acc.loss_sum.fill_(saved["interval"]["loss_sum"])
        acc.wrong.fill_(saved["interval"]["wrong"])
        acc.seen.fill_(saved["interval"]["seen"])
    model.train()  # before a graph is captured: it records the training-mode kernels
    run_start = time.perf_counter() - state.elapsed_s  # wall time includes graph capture (ms_per_iter does not)
    per_rank_batch = options.batch_size // dist_info.world_size
    run_iteration = make_iteration(  # eager or graphed, decided here once (a failed capture: eager)
        step,
        data,
        acc,
        options.batch_size,
        graphs=options.cuda_graphs,
        capture=device.type == "cuda",
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )

    def checkpoint() -> None:
        loss_sum, wrong, seen = _interval_sums(acc, dist_info)
        if dist_info.is_main:
            save_checkpoint(
                ckpt_path,
                {
                    "config_fingerprint": fingerprint,
                    "identity": identity,
                    "model": plain_model.state_dict(),
                    "optimizer": run_iteration.optimizer_state(),
                    "scaler": step.scaler.state_dict() if step.scaler is not None else {},
                    "warmup": schedule.warmup.state_dict() if schedule.warmup is not None else {},
                    "rng": rng_state(device),
                    "run_state": state.state_dict(),
                    "interval": {"loss_sum": loss_sum, "wrong": wrong, "seen": seen},
                },
            )
        if dist_info.world_size > 1:
            dist.barrier()

    scalars = ScalarLog(run_dir, dist_info.is_main, state.iteration)
    progress = Progress(options.max_iter, state.iteration, options.progress and dist_info.is_main, options.description)
    interval_start = time.perf_counter()
    try:
        with StopSignal() as stop:
            while state.iteration < options.max_iter:
                it = state.iteration
                lr = schedule.lr(it)
                wrong = run_iteration(it, lr)
                state.iteration = it + 1
                if schedule.warmup is not None and schedule.warmup.active:
                    err = 100.0 * _all_reduce(wrong.item() / per_rank_batch, device, dist_info, "mean")
                    schedule.warmup.observe(it, [err])
                done = state.iteration == options.max_iter
                if state.iteration % options.log_every == 0 or done:
                    _check_finite(acc, device, dist_info, ckpt_path)
                    now = time.perf_counter()
                    state.train_time_s += now - interval_start
                    loss_sum, wrong_sum, seen = _interval_sums(acc, dist_info)  # the whole global batch's
                    state.last = {
                        "train/loss": loss_sum / max(seen, 1),
                        "train/err": 100.0 * wrong_sum / max(seen, 1),
                        "opt/lr": lr,
                        "perf/img_per_s": seen / max(now - interval_start, 1e-9),
                    }
                    scalars.add(state.iteration, state.last)
                    log.info(
                        "iter %d/%d lr %.4g loss %.4f train err %.2f%% %.0f img/s",
                        state.iteration,
                        options.max_iter,
                        lr,
                        state.last["train/loss"],
                        state.last["train/err"],
                        state.last["perf/img_per_s"],
                    )
                    progress.update(
                        state.iteration,
                        lr=f"{lr:.3g}",
                        loss=f"{state.last['train/loss']:.3f}",
                        err=f"{state.last['train/err']:.1f}%",
                        img_s=f"{state.last['perf/img_per_s']:.0f}",
                    )
                    acc.reset_interval()
                    interval_start = time.perf_counter()
                if (state.iteration % options.eval_every == 0 or done) and dist_info.is_main:
                    _evaluate_all(model, data, options, state, scalars)
                    interval_start = time.perf_counter()
                state.elapsed_s = time.perf_counter() - run_start
                stopping = _should_stop(stop, state.iteration, options, device, dist_info)
                if state.iteration % options.checkpoint_every == 0 or done or stopping:
                    _check_finite(acc, device, dist_info, ckpt_path)
                    checkpoint()
                    scalars.flush()
                    interval_start = time.perf_counter()
                if stopping and not done:
                    name = signal.Signals(stop.received).name if stop.received is not None else "stop (another rank)"
                    message = (
                        f"{name} received; checkpoint written at iteration {state.iteration} to {ckpt_path}; "
                        "rerun the same command to resume"
                    )
                    try:
                        stop.pass_on()
                    except Exception as exc:  # noqa: BLE001 - submitit's "not requeued" (out of max_num_timeout)
                        # an ordinary failure, so submitit records the job's result and the sweep summary lists it
                        raise NotRequeued(f"{message}; the Slurm job was not requeued: {exc}") from exc
                    raise Preempted(message)
    finally:
        progress.close()
        scalars.close()
    return _final_metrics(plain_model, data, options, state, run_info, dist_info.is_main)


def _interval_sums(acc: Accumulators, dist_info: DistInfo) -> tuple[float, float, float]:
    """(loss sum, number wrong, images) since the last log point, over all ranks: the whole global batch's."""
    sums = torch.stack([acc.loss_sum, acc.wrong, acc.seen])
    if dist_info.world_size > 1:
        dist.all_reduce(sums)
    loss_sum, wrong, seen = sums.tolist()
    return loss_sum, wrong, seen


def _should_stop(stop: StopSignal, iteration: int, options: LoopOptions, device, dist_info: DistInfo) -> bool:
    """Stop at this step boundary? One process: as soon as a signal arrived. DDP: every rank must agree (the
    checkpoint has a barrier), so the flag is all-reduced at log intervals, where the loop syncs anyway."""
    if dist_info.world_size == 1:
        return stop.received is not None
    if iteration % options.log_every != 0:
        return False
    return _all_reduce(float(stop.received is not None), device, dist_info, "max") > 0


def _check_finite(acc: Accumulators, device: torch.device, dist_info: DistInfo, ckpt_path: Path) -> None:
    first_bad = int(_all_reduce(float(acc.first_bad.item()), device, dist_info, "max"))
    if first_bad >= 0:
        where = f" (rank {dist_info.rank} of {dist_info.world_size})" if dist_info.world_size > 1 else ""
        raise NonFiniteError(
            f"non-finite loss or gradient at iteration {first_bad}{where}; that update was not applied and the run "
            f"stopped. The last good checkpoint is {ckpt_path} (if one was written). Lower optim.lr or enable "
            "optim.warmup and rerun."
        )


def _evaluate_all(model, data: DeviceData, options: LoopOptions, state: RunState, scalars: ScalarLog) -> None:
    eval_model = unwrap(model)
    test_err, test_loss = evaluate(eval_model, data, "test", options.eval_batch_size)
    state.last.update({"test/err": test_err, "test/loss": test_loss})
    logged = {"test/err": test_err, "test/loss": test_loss}
    if data.x_val is not None:
        val_err, val_loss = evaluate(eval_model, data, "val", options.eval_batch_size)
        logged.update({"val/err": val_err, "val/loss": val_loss})
        state.last.update({"val/err": val_err, "val/loss": val_loss})
        if state.best_val_err is None or val_err < state.best_val_err:
            state.best_val_err, state.best_val_iter = val_err, state.iteration
    scalars.add(state.iteration, logged)
    log.info(
        "iter %d test err %.2f%% loss %.4f%s",
        state.iteration,
        test_err,
        test_loss,
        f" | val err {logged['val/err']:.2f}%" if "val/err" in logged else "",
    )


def _final_metrics(
    model, data: DeviceData, options: LoopOptions, state: RunState, run_info: dict, is_main: bool
) -> dict[str, Any]:
    """metrics.json's content. Under DDP only rank 0 evaluates: other ranks return no test, val or response numbers."""
    responses = None
    if options.compute_responses and is_main and run_info.get("arch") in ("plain", "resnet"):
        from resnet_repro.models.responses import layer_response_std

        responses = layer_response_std(model, data.normalized_test_images())
    last = state.last
    return {
        **run_info,
        "status": "finished",
        "iterations": state.iteration,
        "max_iter": options.max_iter,
        "eval_precision": EVAL_PRECISION,
        "final_test_err": last.get("test/err"),
        "final_test_loss": last.get("test/loss"),
        "final_train_err": last.get("train/err"),
        "final_train_loss": last.get("train/loss"),
        "final_val_err": last.get("val/err"),
        "best_val_err": state.best_val_err,
        "best_val_iter": state.best_val_iter,
        "wall_time_s": state.elapsed_s,
        "ms_per_iter": 1000.0 * state.train_time_s / max(state.iteration, 1),
        "layer_response_std": responses,
        "date": now_iso(),
    }


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json atomically; its presence marks the run as finished."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
        raise NonFiniteError(f"refusing to write non-finite metrics to {run_dir / METRICS_NAME}")
    atomic_write_json(run_dir / METRICS_NAME, metrics)
