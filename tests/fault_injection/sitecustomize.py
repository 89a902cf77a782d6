"""Fault injection for the reliability tests: die (or raise, or signal) at a named point of a chosen iteration.

A Python process started with this directory on PYTHONPATH imports this file at start-up (as `sitecustomize`); if
`RESNET_REPRO_FAULT=<point>@<iteration>[/<action>]` is set, the fault is armed for the whole process, e.g.

    RESNET_REPRO_FAULT=step@17 python -m resnet_repro.train ...                       # SIGKILL before iteration 17
    RESNET_REPRO_FAULT=checkpoint:before_rename@40 python -m resnet_repro.train ...   # SIGKILL mid-checkpoint
    RESNET_REPRO_FAULT=step@25/term python -m resnet_repro.train ...                  # SIGTERM to itself

`environment(spec)` and `arm_subprocesses(monkeypatch, spec)` set both variables for the CLI subprocesses a test
starts (Slurm jobs inherit the submitter's environment, so they are armed too). Tests that train in-process use
`inject(spec)` instead. Nothing in resnet_repro knows about faults: arming one wraps package functions.

Points (`iteration` = iterations completed when the point is reached):
- `step`: at the top of the loop, before iteration `iteration` runs. engine.fit asks `Schedule.lr(iteration)` for
  the rate first thing in every iteration, so the fault fires inside that call, before the rate is computed;
- `checkpoint:before_fsync`, `checkpoint:before_rename`, `checkpoint:after_rename`: inside the atomic write of
  the checkpoint taken after `iteration` iterations (the `torch.save` that writes its `run_state`, then the
  `os.fsync` and `os.replace` that resnet_repro.checkpoint calls): data written and flushed but not fsynced;
  fsynced but not yet renamed over last.pt; renamed but the directory not yet fsynced.
Actions: `kill` (default; SIGKILL, so nothing runs after it: no `finally`, no cleanup), `raise` (FaultInjected,
an ordinary exception: a sweep goes on with its other runs), `term` / `usr1` / `usr2` (send SIGTERM / SIGUSR1 /
SIGUSR2 to this process and carry on).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "RESNET_REPRO_FAULT"
DIRECTORY = Path(__file__).resolve().parent
POINTS = ("step", "checkpoint:before_fsync", "checkpoint:before_rename", "checkpoint:after_rename")
SIGNALS = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2}
ACTIONS = ("kill", "raise", *SIGNALS)


class FaultInjected(RuntimeError):
    """Raised by a fault with action `raise`."""


@dataclass(frozen=True)
class Fault:
    """One armed fault: fire `action` when `point` is reached at `iteration`."""

    point: str
    iteration: int
    action: str = "kill"

    def check(self, point: str, iteration: int | None) -> None:
        """Fire if this is the fault's point and iteration; otherwise do nothing."""
        if (point, iteration) != (self.point, self.iteration):
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "raise":
            raise FaultInjected(f"fault injected at iteration {iteration} ({point})")
        else:
            os.kill(os.getpid(), SIGNALS[self.action])


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


class _ModuleView:
    """A module with a few of its functions replaced; every other attribute is the module's own."""

    def __init__(self, module: Any, **replaced: Callable[..., Any]) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _arm(fault: Fault) -> Callable[[], None]:
    """Wrap `Schedule.lr` and resnet_repro.checkpoint's torch.save, os.fsync and os.replace so that they pass
    through `fault.check`; returns the function that puts the originals back."""
    import torch

    from resnet_repro import checkpoint
    from resnet_repro.optim import Schedule

    lr = Schedule.lr
    writing: dict[str, int] = {}  # the iteration of the checkpoint being written: "saved", then "synced"

    def checked_lr(schedule: Schedule, iteration: int) -> float:
        fault.check("step", iteration)
        return lr(schedule, iteration)

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        torch.save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and "run_state" in obj:
            writing["saved"] = obj["run_state"]["iteration"]

    def fsync(fd: int) -> None:
        iteration = writing.pop("saved", None)
        if iteration is not None:
            writing["synced"] = iteration
            fault.check("checkpoint:before_fsync", iteration)
        os.fsync(fd)

    def replace(source: str | Path, target: str | Path) -> None:
        iteration = writing.pop("synced", None)
        fault.check("checkpoint:before_rename", iteration)
        os.replace(source, target)
        fault.check("checkpoint:after_rename", iteration)

    Schedule.lr = checked_lr  # type: ignore[method-assign]
    checkpoint.torch = _ModuleView(torch, save=save)  # type: ignore[assignment]
    checkpoint.os = _ModuleView(os, fsync=fsync, replace=replace)  # type: ignore[assignment]

    def disarm() -> None:
        Schedule.lr = lr  # type: ignore[method-assign]
        checkpoint.torch, checkpoint.os = torch, os

    return disarm


@contextlib.contextmanager
def inject(spec: str | None) -> Iterator[Fault | None]:
    """Arm a fault (or none) in this process for the duration of a `with` block."""
    if not spec:
        yield None
        return
    fault = parse(spec)
    disarm = _arm(fault)
    try:
        yield fault
    finally:
        disarm()


def environment(spec: str | None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` for a Python subprocess that arms `spec` (none: no fault, whatever `env` holds): this directory first
    on PYTHONPATH and RESNET_REPRO_FAULT set."""
    env = {key: value for key, value in env.items() if key != ENV_VAR}
    if spec:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DIRECTORY), env.get("PYTHONPATH")) if p)
        env[ENV_VAR] = spec
    return env


def arm_subprocesses(monkeypatch: Any, spec: str) -> None:
    """Arm `spec` in every Python subprocess the running test starts (pytest's `monkeypatch` undoes it after)."""
    armed = environment(spec)
    for key in ("PYTHONPATH", ENV_VAR):
        monkeypatch.setenv(key, armed[key])


if __name__ == "sitecustomize" and os.environ.get(ENV_VAR):  # Python's start-up import, not a test's
    _arm(parse(os.environ[ENV_VAR]))
