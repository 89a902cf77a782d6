"""One SGD iteration of the runner, and the two ways `engine.fit` drives it.

`TrainStep` is forward, loss, backward, non-finite guard and update on a given batch. An iteration also fetches
its batch and counts it: `EagerIteration` does that op by op; `GraphedIteration` reads the batch's indices from
static buffers so that the whole iteration (augmentation, step, sums) can be captured in one CUDA graph and
replayed, which removes the per-kernel launch cost that dominates these small networks on a GPU.
`make_iteration` picks one of them, once, before the loop starts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from resnet_repro.data import DeviceData
from resnet_repro.optim import set_lr

log = logging.getLogger(__name__)

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN/cuBLAS handles, autotuning, compile)


@dataclass
class Accumulators:
    """Device-side sums over the current logging interval, plus the first non-finite iteration (-1 = none)."""

    loss_sum: torch.Tensor
    wrong: torch.Tensor
    seen: torch.Tensor
    step_counter: torch.Tensor
    first_bad: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device, iteration: int) -> Accumulators:
        """Fresh accumulators; `step_counter` starts at `iteration`."""
        z = torch.zeros((), device=device, dtype=torch.float64)
        return cls(
            z.clone(), z.clone(), z.clone(), torch.tensor(iteration, device=device), torch.tensor(-1, device=device)
        )

    def reset_interval(self) -> None:
        """Zero the interval sums."""
        for t in (self.loss_sum, self.wrong, self.seen):
            t.zero_()

    def add(self, loss_sum: torch.Tensor, wrong: torch.Tensor, bad: torch.Tensor, n: int) -> None:
        """Count one step of `n` images (device ops only); remember the step's number if it was non-finite."""
        self.loss_sum += loss_sum
        self.wrong += wrong
        self.seen += n
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad, self.step_counter, self.first_bad))
        self.step_counter += 1

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulator tensor (for snapshots)."""
        return [self.loss_sum, self.wrong, self.seen, self.step_counter, self.first_bad]


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 (weights and BN stay fp32), nothing for fp32.

    The cast-weight cache is off: PyTorch's CUDA-graph notes require that for captured autocast regions, and it
    saves nothing here (each weight is used once per forward pass)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def nonfinite_flag(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Device bool: is the loss or any gradient NaN/inf? (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads)) if grads else loss.new_zeros(1)
    return ~(torch.isfinite(loss) & torch.isfinite(norms).all())


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Create SGD's momentum buffers as zeros before the first step (results are bit-identical: 0.9*0 + g = g).

    Fused SGD skips an update whose `found_inf` is set (our non-finite guard, or GradScaler's overflow check,
    which routinely fires on fp16's first step) but, on the very first step, still stores the buffers it
    allocated with `torch.empty_like`: uninitialised memory that every later step would then add in.
    """
    for group in optimizer.param_groups:
        if group.get("momentum", 0) != 0:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every momentum buffer its parameter's memory layout (strides), after loading a checkpoint.

    A checkpoint keeps the layout it was written with, so resuming it with another `trainer.channels_last` (or
    on another device, where that key defaults differently) pairs channels_last parameters with contiguous
    buffers or the reverse. Fused SGD assumes that the two share strides: CUDA's kernel refuses the step, CPU's
    silently adds the wrong elements. The values are unchanged; only their order in memory is.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state[p].get("momentum_buffer") if p in optimizer.state else None
            if buffer is not None and buffer.stride() != p.stride():
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffer)


class TrainStep:
    """One SGD iteration: forward, loss, backward, non-finite guard, update. Also what `make bench` times."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str, device: torch.device):
        self.model, self.optimizer, self.precision, self.device = model, optimizer, precision, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.guard_in_optimizer = getattr(optimizer, "_step_supports_amp_scaling", False) and self.scaler is None
        if self.guard_in_optimizer or self.scaler is not None:
            zero_momentum_buffers(optimizer)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one iteration; returns device tensors (summed loss, number wrong, non-finite flag)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.precision):
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            bad = ~torch.isfinite(loss)
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
        else:
            loss.backward()
            bad = nonfinite_flag(loss, self.params)
            if self.guard_in_optimizer:
                # Fused SGD skips the whole update (weights and momentum) when found_inf is 1: no host sync.
                self.optimizer.found_inf = bad.float()
                self.optimizer.grad_scale = None
                self.optimizer.step()
            elif not bool(bad):
                self.optimizer.step()
        wrong = (logits.detach().argmax(dim=1) != labels).sum()
        return loss.detach() * labels.shape[0], wrong, bad


class EagerIteration:
    """Iteration `it` op by op: set the lr, build this rank's batch, step, count."""

    def __init__(
        self, step: TrainStep, data: DeviceData, acc: Accumulators, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.step, self.data, self.acc = step, data, acc
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def optimizer_state(self) -> dict[str, Any]:
        """`optimizer.state_dict()`, for checkpoints."""
        return self.step.optimizer.state_dict()

    def __call__(self, iteration: int, lr: float) -> torch.Tensor:
        """Train on iteration `iteration`'s batch at rate `lr`; returns the number wrong (device tensor)."""
        set_lr(self.step.optimizer, lr)
        images, labels = self.data.train_batch(iteration, self.batch_size, self.rank, self.world_size)
        loss_sum, wrong, bad = self.step(images, labels)
        self.acc.add(loss_sum, wrong, bad, labels.shape[0])
        return wrong


class GraphedIteration:
    """Iteration `it` from static buffers: on CUDA one captured graph, replayed; elsewhere the same body, run.

    Per iteration the host copies the batch's stream indices, crop offsets and flips into static device buffers
    and writes the rate into the device tensor the fused SGD kernel reads (only when it changes); the graph then
    does the gather, normalisation, crop/flip, forward, loss, backward, non-finite guard, fused update and the
    accumulator sums. One process only (no DDP), fused SGD, no GradScaler (fp16 needs a host-side step).
    Capture needs a few eager warm-up steps, which train: every parameter, buffer, momentum buffer and accumulator
    is copied before them and copied back in place after capture, so capturing changes no number.
    """

    def __init__(self, step: TrainStep, data: DeviceData, acc: Accumulators, batch_size: int, capture: bool) -> None:
        if not step.guard_in_optimizer:
            raise ValueError("a graphed iteration needs fused SGD without GradScaler (its guard has no host sync)")
        self.step, self.data, self.acc, self.batch_size = step, data, acc, batch_size
        device = data.device
        self._lr = float(step.optimizer.param_groups[0]["lr"])  # the exact rate; the tensor holds it in fp32
        for group in step.optimizer.param_groups:
            group["lr"] = torch.tensor(self._lr, dtype=torch.float32, device=device)
        self.idx = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.offset_y, self.offset_x = torch.zeros_like(self.idx), torch.zeros_like(self.idx)
        self.flip = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.wrong: torch.Tensor | None = None
        self.capture_s = 0.0
        self.capture_peak_extra = 0
        if capture:
            self.capture()

    def _load(self, iteration: int) -> None:
        """Copy iteration `iteration`'s image indices, crop offsets and flips into the static buffers."""
        idx, oy, ox, flip = self.data.stream_indices(iteration * self.batch_size, self.batch_size)
        for static, value in ((self.idx, idx), (self.offset_y, oy), (self.offset_x, ox), (self.flip, flip)):
            static.copy_(value, non_blocking=True)

    def _body(self) -> torch.Tensor:
        """Gather and augment the batch of the static buffers, step and count it; returns the number wrong."""
        images, labels = self.data.gather(self.idx, self.offset_y, self.offset_x, self.flip)
        loss_sum, wrong, bad = self.step(images, labels)
        self.acc.add(loss_sum, wrong, bad, self.batch_size)
        return wrong

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes: parameters, buffers, momentum buffers, accumulators."""
        model, optimizer = self.step.model, self.step.optimizer
        momentum = [optimizer.state[p]["momentum_buffer"] for p in self.step.params if p in optimizer.state]
        return [*model.parameters(), *model.buffers(), *momentum, *self.acc.tensors()]

    def capture(self) -> None:
        """Capture the iteration into a CUDA graph (after eager warm-up steps whose updates are undone, also when
        the capture fails)."""
        device = self.data.device
        started = time.perf_counter()
        state = self._state_tensors()
        saved = [t.detach().clone() for t in state]
        try:
            self._load(0)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._body()
            torch.cuda.current_stream(device).wait_stream(side)
            self.step.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread (e.g. a DataLoader's pin-memory thread) may allocate while this one captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.wrong = self._body()
            torch.cuda.synchronize(device)
            self.capture_peak_extra = torch.cuda.max_memory_allocated(device) - base
        finally:  # also when capture fails: the warm-up steps' updates are undone either way
            with torch.no_grad():
                for tensor, value in zip(state, saved, strict=True):
                    tensor.copy_(value)
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - started
        log.info("CUDA graph captured in %.1f s (%.0f MB extra)", self.capture_s, self.capture_peak_extra / 2**20)

    def optimizer_state(self) -> dict[str, Any]:
        """`optimizer.state_dict()` with the rate as the float last set (as the eager iteration stores it)."""
        state = self.step.optimizer.state_dict()
        for group in state["param_groups"]:
            group["lr"] = self._lr
        return state

    def __call__(self, iteration: int, lr: float) -> torch.Tensor:
        """Train on iteration `iteration`'s batch at rate `lr`; returns the number wrong (device tensor)."""
        if lr != self._lr:
            for group in self.step.optimizer.param_groups:
                group["lr"].fill_(lr)
            self._lr = lr
        self._load(iteration)
        if self.graph is None:
            return self._body()
        self.graph.replay()
        assert self.wrong is not None
        return self.wrong


def make_iteration(
    step: TrainStep,
    data: DeviceData,
    acc: Accumulators,
    batch_size: int,
    graphs: bool,
    capture: bool,
    rank: int = 0,
    world_size: int = 1,
) -> EagerIteration | GraphedIteration:
    """The iteration a run trains with: eager, or with `graphs` the graphed one (captured when `capture`: on CUDA).

    A capture that fails is not fatal: a warning, then the eager iteration, which computes the same numbers (the
    capture's warm-up steps were undone), only slower.
    """
    if not graphs:
        return EagerIteration(step, data, acc, batch_size, rank, world_size)
    if world_size > 1:
        raise ValueError("CUDA graphs are for one process; DDP runs the eager iteration")
    graphed = GraphedIteration(step, data, acc, batch_size, capture=False)
    if capture:
        try:
            graphed.capture()
        except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly instead
            log.warning(
                "CUDA graph capture failed (%s: %s); training with the eager iteration instead (same numbers, "
                "slower). trainer.cuda_graphs=false skips the attempt.",
                type(exc).__name__,
                exc,
            )
            return EagerIteration(step, data, acc, batch_size)
    return graphed
