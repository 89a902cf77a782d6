"""SGD and the learning rate as a pure function of the iteration (paper section 4.2), with the 110-layer warm-up."""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def lr_at(iteration: int, base_lr: float, milestones: Sequence[int], gamma: float) -> float:
    """Learning rate of `iteration` (0-based): base_lr * gamma ** (number of milestones <= iteration)."""
    return base_lr * gamma ** bisect_right(list(milestones), iteration)


@dataclass
class Warmup:
    """The paper's warm-up for ResNet-110/1202: lr `warmup_lr` until the training error drops below a threshold.

    The training error is the mean over the last `window` minibatches (each minibatch's error in %, measured in
    training mode on the augmented batch). Once the mean of a full window is below `until_err`, warm-up ends for
    good and the schedule returns to `lr_at` (milestones unchanged). After `max_iter` iterations it ends anyway,
    with a warning.
    """

    lr: float = 0.01
    until_err: float = 80.0
    window: int = 50
    max_iter: int = 2000
    active: bool = True
    ended_at: int | None = None
    recent_errors: deque = field(default_factory=deque)

    def observe(self, iteration: int, batch_errors: Sequence[float]) -> None:
        """Feed the per-minibatch training errors (%) of the iterations ending at `iteration` (inclusive)."""
        if not self.active:
            return
        for err in batch_errors:
            self.recent_errors.append(float(err))
            while len(self.recent_errors) > self.window:
                self.recent_errors.popleft()
        if len(self.recent_errors) == self.window and sum(self.recent_errors) / self.window < self.until_err:
            self._end(iteration + 1, f"training error {sum(self.recent_errors) / self.window:.1f}% < {self.until_err}%")
        elif iteration + 1 >= self.max_iter:
            log.warning(
                "warm-up never reached training error < %.1f%%; ending it at iteration %d (optim.warmup_max_iter)",
                self.until_err,
                iteration + 1,
            )
            self._end(iteration + 1, "optim.warmup_max_iter reached")

    def _end(self, iteration: int, why: str) -> None:
        self.active, self.ended_at = False, iteration
        self.recent_errors.clear()
        log.info("warm-up ends at iteration %d (%s); lr back to the schedule", iteration, why)

    def state_dict(self) -> dict:
        """Plain-data state for checkpoints (weights_only-loadable)."""
        return {"active": self.active, "ended_at": self.ended_at, "recent_errors": list(self.recent_errors)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.active, self.ended_at = bool(state["active"]), state["ended_at"]
        self.recent_errors = deque(float(e) for e in state["recent_errors"])


@dataclass
class Schedule:
    """The full learning-rate rule: milestones schedule, overridden by the warm-up while it is active."""

    base_lr: float
    milestones: Sequence[int]
    gamma: float
    warmup: Warmup | None = None

    def lr(self, iteration: int) -> float:
        """Learning rate to use at `iteration`."""
        if self.warmup is not None and self.warmup.active:
            return self.warmup.lr
        return lr_at(iteration, self.base_lr, self.milestones, self.gamma)


def make_sgd(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float, fused: bool) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (the paper's Caffe solver does the same)."""
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
