"""Fault injection for the reliability tests: die (or raise, or signal) at a named point of a chosen iteration.

Set `RESNET_REPRO_FAULT=<point>@<iteration>[/<action>]` in the environment of a training command, e.g.

    RESNET_REPRO_FAULT=step@17 python -m resnet_repro.train ...                       # SIGKILL before iteration 17
    RESNET_REPRO_FAULT=checkpoint:before_rename@40 python -m resnet_repro.train ...   # SIGKILL mid-checkpoint
    RESNET_REPRO_FAULT=step@25/term python -m resnet_repro.train ...                  # SIGTERM to itself

Points (`iteration` = iterations completed when the point is reached):
- `step`: at the top of the loop, before iteration `iteration` runs (engine.fit);
- `checkpoint:before_fsync`, `checkpoint:before_rename`, `checkpoint:after_rename`: inside the atomic write of
  the checkpoint taken after `iteration` iterations (checkpoint.atomic_write_bytes): data written and flushed
  but not fsynced; fsynced but not yet renamed over last.pt; renamed but the directory not yet fsynced.
Actions: `kill` (default; SIGKILL, so nothing runs after it: no `finally`, no cleanup), `raise` (FaultInjected,
an ordinary exception), `term` / `usr1` / `usr2` (send SIGTERM / SIGUSR1 / SIGUSR2 to this process and carry on).

The variable is read once, at import. When it is unset, `check` returns after one `is None` test.
Tests that run in-process use `inject(spec)` instead of the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

ENV_VAR = "RESNET_REPRO_FAULT"
POINTS = ("step", "checkpoint:before_fsync", "checkpoint:before_rename", "checkpoint:after_rename")
ACTIONS = ("kill", "raise", "term", "usr1", "usr2")


class FaultInjected(RuntimeError):
    """Raised by a fault with action `raise`."""


@dataclass(frozen=True)
class Fault:
    """One armed fault: fire `action` when `point` is reached at `iteration`."""

    point: str
    iteration: int
    action: str = "kill"


def parse(spec: str) -> Fault:
    """Parse `<point>@<iteration>[/<action>]`; raises ValueError naming the variable and the valid values."""
    try:
        where, _, action = spec.strip().partition("/")
        point, _, iteration = where.rpartition("@")
        fault = Fault(point, int(iteration), action or "kill")
    except ValueError:
        fault = None
    if fault is None or fault.point not in POINTS or fault.action not in ACTIONS or fault.iteration < 0:
        raise ValueError(
            f"{ENV_VAR}={spec!r} is not valid: expected <point>@<iteration>[/<action>] with point in {POINTS} "
            f"and action in {ACTIONS}"
        )
    return fault


_ARMED: Fault | None = parse(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None


def check(point: str, iteration: int) -> None:
    """Fire the armed fault if it is for this point and iteration; otherwise (and always when unset) do nothing."""
    if _ARMED is None or _ARMED.point != point or _ARMED.iteration != iteration:
        return
    if _ARMED.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif _ARMED.action == "raise":
        raise FaultInjected(f"fault injected at {point}@{iteration}")
    else:
        os.kill(os.getpid(), {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2}[_ARMED.action])


@contextlib.contextmanager
def inject(spec: str | None) -> Iterator[Fault | None]:
    """Arm a fault (or none) for the duration of a `with` block, in-process; restores the previous one after."""
    global _ARMED
    previous, _ARMED = _ARMED, parse(spec) if spec else None
    try:
        yield _ARMED
    finally:
        _ARMED = previous
