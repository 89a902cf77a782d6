"""The training loop: one counter of iterations, the paper's schedule, periodic evaluation, checkpoints.

`fit()` takes plain objects (no Hydra). Inside the step loop nothing waits for the device except at
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
from resnet_repro.config import TrainConfig
from resnet_repro.data import DeviceData
from resnet_repro.optim import Schedule
from resnet_repro.run_dir import METRICS_NAME, Preempted
from resnet_repro.step import Accumulators, TrainStep, make_iteration, match_parameter_layouts
from resnet_repro.tracking import Progress, ScalarLog, now_iso

log = logging.getLogger(__name__)

EVAL_PRECISION = "fp32"  # test/val errors and Figure-7 responses: always fp32 (metrics.json says so)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the update of that iteration was not applied."""


class NotRequeued(RuntimeError):
    """SIGUSR2 arrived under submitit, the checkpoint was written, and submitit would not requeue the job (it had
    timed out too often): the run is recorded as failed; rerunning the sweep resumes it from the checkpoint."""


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
        """Install the handler for the three signals (in the main thread only), remembering the previous ones."""
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        """Remember which signal arrived; the loop stops at its next step boundary."""
        self.received = signum

    def pass_on(self) -> None:
        """After the checkpoint: if SIGUSR2 arrived and a Python handler had it before us, call that handler.
        Under submitit it requeues the Slurm job and exits, now without losing iterations. Other signals, and
        default or ignored handlers, are left alone (the run then stops with Preempted)."""
        previous = self._previous.get(signal.SIGUSR2)
        if self.received == signal.SIGUSR2 and callable(previous):
            previous(self.received, None)

    def __exit__(self, *exc) -> None:
        """Put the previous handlers back."""
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


def fit(run: TrainingRun, run_info: dict[str, Any]) -> dict[str, Any]:
    """Train `run` to `optim.max_iter` (from where its checkpoint left off) and return its metrics; `run_info`
    (arch, depth, config, versions, ...) is copied into metrics.json, which rank 0 writes last and atomically."""
    max_iter, every, schedule, state = run.cfg.optim.max_iter, run.cfg.trainer, run.schedule, run.state
    try:
        with StopSignal() as stop:
            while state.iteration < max_iter:
                it = state.iteration
                lr = schedule.lr(it)
                wrong = run.iterate(it, lr)  # this rank's batch, forward, backward, update; sums kept on the device
                state.iteration = it + 1
                run.observe_warmup(it, wrong)
                done = state.iteration == max_iter
                if _due(state.iteration, every.log_every, done):
                    run.log_point(lr)
                if _due(state.iteration, every.eval_every, done) and run.dist_info.is_main:
                    run.evaluate()
                state.elapsed_s = time.perf_counter() - run.start_time
                stopping = run.should_stop(stop)
                if _due(state.iteration, every.checkpoint_every, done) or stopping:
                    run.checkpoint()
                if stopping and not done:
                    run.stop_for_requeue(stop)
    finally:
        run.close()
    return run.final_metrics(run_info)


def _due(iteration: int, every: int, done: bool) -> bool:
    """Is periodic work due after `iteration` iterations: a multiple of `every`, or the last iteration?"""
    return iteration % every == 0 or done


class TrainingRun:
    """What `fit` trains: the model, resumed from run_dir/checkpoints/last.pt if there is one, with the work `fit`'s
    loop does besides the iteration itself (warm-up, log points, evaluations, checkpoints, the stop at a signal).

    `cfg` gives the lengths and intervals (optim.max_iter, data.batch_size, trainer.*_every), `precision` the training
    arithmetic as resolved for the device. `model` may be wrapped (DDP, torch.compile). `fingerprint` (the config's)
    and `identity` (the data's hash, the training precision) are stored in every checkpoint; a resume must match both.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        data: DeviceData,
        run_dir: Path,
        cfg: TrainConfig,
        precision: str,
        fingerprint: str,
        identity: dict[str, str],
        dist_info: DistInfo | None = None,
    ) -> None:
        self.model, self.plain_model, self.schedule, self.data = model, unwrap(model), schedule, data
        self.cfg, self.dist_info, self.device = cfg, dist_info or DistInfo(), data.device
        self.fingerprint, self.identity = fingerprint, identity
        self.ckpt_path = run_dir / "checkpoints" / CHECKPOINT_NAME
        self.step = TrainStep(model, optimizer, precision, self.device)
        saved = self._restore()
        self.state = RunState(**saved["run_state"]) if saved else RunState()
        self.acc = Accumulators.zeros(self.device, self.state.iteration)
        if "interval" in saved and self.dist_info.is_main:  # all ranks' sums since the last log point, kept by rank 0
            for name in ("loss_sum", "wrong", "seen"):
                getattr(self.acc, name).fill_(saved["interval"][name])
        model.train()  # before a graph is captured: it records the training-mode kernels
        self.start_time = time.perf_counter() - self.state.elapsed_s  # wall time counts graph capture, ms_per_iter not
        self.iterate = make_iteration(  # eager or graphed, decided here once (a failed capture: eager)
            self.step,
            data,
            self.acc,
            cfg.data.batch_size,
            graphs=cfg.trainer.cuda_graphs,
            capture=self.device.type == "cuda",
            rank=self.dist_info.rank,
            world_size=self.dist_info.world_size,
        )
        main = self.dist_info.is_main
        self.scalars = ScalarLog(run_dir, main, self.state.iteration)
        description = f"{cfg.model.arch}-{cfg.model.depth}"
        self.progress = Progress(cfg.optim.max_iter, self.state.iteration, cfg.trainer.progress and main, description)
        self.interval_start = time.perf_counter()

    def _restore(self) -> dict[str, Any]:
        """Load the checkpoint, if there is one, into the model, optimizer, GradScaler, warm-up and random
        generators (checked against this run first); returns it, or {} for a fresh start."""
        if not self.ckpt_path.exists():
            return {}
        saved = load_checkpoint(self.ckpt_path, self.fingerprint, self.plain_model, self.identity)
        self.plain_model.load_state_dict(saved["model"])
        self.step.optimizer.load_state_dict(saved["optimizer"])
        match_parameter_layouts(self.step.optimizer)
        if self.step.scaler is not None and saved.get("scaler"):
            self.step.scaler.load_state_dict(saved["scaler"])
        if self.schedule.warmup is not None:
            self.schedule.warmup.load_state_dict(saved["warmup"])
        restore_rng_state(saved["rng"], self.device)
        log.info("resumed from %s at iteration %d", self.ckpt_path, saved["run_state"]["iteration"])
        return saved

    def observe_warmup(self, iteration: int, wrong: torch.Tensor) -> None:
        """While the warm-up lasts, feed it this iteration's training error over all ranks (a host sync)."""
        warmup = self.schedule.warmup
        if warmup is not None and warmup.active:
            per_rank_batch = self.cfg.data.batch_size // self.dist_info.world_size
            warmup.observe(iteration, [100.0 * self._all_reduce(wrong.item() / per_rank_batch, "mean")])

    def log_point(self, lr: float) -> None:
        """Training loss, error and speed since the last log point, over all ranks, to TensorBoard, the log and the
        progress bar; a non-finite step raises NonFiniteError first."""
        self._raise_if_nonfinite()
        now = time.perf_counter()
        self.state.train_time_s += now - self.interval_start
        loss_sum, wrong, seen = self._interval_sums()
        loss, err = loss_sum / max(seen, 1), 100.0 * wrong / max(seen, 1)  # the whole global batch's
        speed = seen / max(now - self.interval_start, 1e-9)
        it, max_iter = self.state.iteration, self.cfg.optim.max_iter
        self.state.last = {"train/loss": loss, "train/err": err, "opt/lr": lr, "perf/img_per_s": speed}
        self.scalars.add(it, self.state.last)
        log.info("iter %d/%d lr %.4g loss %.4f train err %.2f%% %.0f img/s", it, max_iter, lr, loss, err, speed)
        self.progress.update(it, lr=f"{lr:.3g}", loss=f"{loss:.3f}", err=f"{err:.1f}%", img_s=f"{speed:.0f}")
        self.acc.reset_interval()
        self.interval_start = time.perf_counter()

    def evaluate(self) -> None:
        """Test (and validation) error and loss of the current weights, in fp32, to TensorBoard and the log; keeps
        the best validation error."""
        state, batch_size = self.state, self.cfg.data.eval_batch_size
        test_err, test_loss = evaluate(self.plain_model, self.data, "test", batch_size)
        logged = {"test/err": test_err, "test/loss": test_loss}
        val = ""
        if self.data.x_val is not None:
            val_err, val_loss = evaluate(self.plain_model, self.data, "val", batch_size)
            logged.update({"val/err": val_err, "val/loss": val_loss})
            if state.best_val_err is None or val_err < state.best_val_err:
                state.best_val_err, state.best_val_iter = val_err, state.iteration
            val = f" | val err {val_err:.2f}%"
        state.last.update(logged)
        self.scalars.add(state.iteration, logged)
        log.info("iter %d test err %.2f%% loss %.4f%s", state.iteration, test_err, test_loss, val)
        self.interval_start = time.perf_counter()

    def should_stop(self, stop: StopSignal) -> bool:
        """Stop at this step boundary? One process: as soon as a signal arrived. DDP: every rank must agree (the
        checkpoint has a barrier), so the flag is all-reduced at log intervals, where the loop syncs anyway."""
        if self.dist_info.world_size == 1:
            return stop.received is not None
        if self.state.iteration % self.cfg.trainer.log_every != 0:
            return False
        return self._all_reduce(float(stop.received is not None), "max") > 0

    def checkpoint(self) -> None:
        """Write last.pt (rank 0; every rank waits for it) and flush the scalars; a non-finite step raises
        NonFiniteError first, so no checkpoint ever holds one."""
        self._raise_if_nonfinite()
        loss_sum, wrong, seen = self._interval_sums()
        if self.dist_info.is_main:
            save_checkpoint(
                self.ckpt_path,
                {
                    "config_fingerprint": self.fingerprint,
                    "identity": self.identity,
                    "model": self.plain_model.state_dict(),
                    "optimizer": self.iterate.optimizer_state(),
                    "scaler": self.step.scaler.state_dict() if self.step.scaler is not None else {},
                    "warmup": self.schedule.warmup.state_dict() if self.schedule.warmup is not None else {},
                    "rng": rng_state(self.device),
                    "run_state": self.state.state_dict(),
                    "interval": {"loss_sum": loss_sum, "wrong": wrong, "seen": seen},
                },
            )
        if self.dist_info.world_size > 1:
            dist.barrier()
        self.scalars.flush()
        self.interval_start = time.perf_counter()

    def stop_for_requeue(self, stop: StopSignal) -> None:
        """After the stop's checkpoint: hand SIGUSR2 on to submitit's handler (which requeues the Slurm job), then
        end the run with Preempted, or NotRequeued when submitit would not requeue it."""
        name = signal.Signals(stop.received).name if stop.received is not None else "stop (another rank)"
        message = (
            f"{name} received; checkpoint written at iteration {self.state.iteration} to {self.ckpt_path}; "
            "rerun the same command to resume"
        )
        try:
            stop.pass_on()
        except Exception as exc:  # noqa: BLE001 - submitit's "not requeued" (out of max_num_timeout)
            # an ordinary failure, so submitit records the job's result and the sweep summary lists it
            raise NotRequeued(f"{message}; the Slurm job was not requeued: {exc}") from exc
        raise Preempted(message)

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer."""
        self.progress.close()
        self.scalars.close()

    def final_metrics(self, run_info: dict[str, Any]) -> dict[str, Any]:
        """metrics.json's content: `run_info` and the run's results. Under DDP only rank 0 evaluates: other ranks
        return no test, val or response numbers."""
        state, last, responses = self.state, self.state.last, None
        if self.cfg.responses and self.dist_info.is_main and self.cfg.model.arch in ("plain", "resnet"):
            from resnet_repro.models.responses import layer_response_std

            responses = layer_response_std(self.plain_model, self.data.normalized_test_images())
        return {
            **run_info,
            "status": "finished",
            "iterations": state.iteration,
            "max_iter": self.cfg.optim.max_iter,
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

    def _interval_sums(self) -> tuple[float, float, float]:
        """(loss sum, number wrong, images) since the last log point, over all ranks: the whole global batch's."""
        sums = torch.stack([self.acc.loss_sum, self.acc.wrong, self.acc.seen])
        if self.dist_info.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, wrong, seen = sums.tolist()
        return loss_sum, wrong, seen

    def _raise_if_nonfinite(self) -> None:
        """Raise NonFiniteError naming the first non-finite iteration of the run (on any rank), if there was one."""
        first_bad = int(self._all_reduce(float(self.acc.first_bad.item()), "max"))
        if first_bad >= 0:
            rank, world_size = self.dist_info.rank, self.dist_info.world_size
            where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
            raise NonFiniteError(
                f"non-finite loss or gradient at iteration {first_bad}{where}; that update was not applied and the "
                f"run stopped. The last good checkpoint is {self.ckpt_path} (if one was written). Lower optim.lr or "
                "enable optim.warmup and rerun."
            )

    def _all_reduce(self, value: float, how: str) -> float:
        """`how` = 'max' or 'mean' of a float over all ranks (identity with one process)."""
        if self.dist_info.world_size == 1:
            return value
        t = torch.tensor(value, device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
        return t.item() if how == "max" else t.item() / self.dist_info.world_size


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json atomically; its presence marks the run as finished."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
        raise NonFiniteError(f"refusing to write non-finite metrics to {run_dir / METRICS_NAME}")
    atomic_write_json(run_dir / METRICS_NAME, metrics)
