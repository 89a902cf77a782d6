"""`make reproduce LAUNCHER=local`'s check of K (runs per GPU, gpu_slots.runs_per_gpu) before its launchers start."""

from __future__ import annotations

from resnet_repro.gpu_slots import runs_per_gpu


def decide_for_local_sweeps() -> None:
    """Check `$RESNET_REPRO_RUNS_PER_GPU` once, before the experiments' launchers start: a bad value stops reproduce
    with one ConfigError naming the variable, instead of failing in every launcher."""
    runs_per_gpu()
