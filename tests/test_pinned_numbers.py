"""Refactoring the loop must not move a number: a fixed-seed short run gives bit-identical losses, errors and final
weights to the values recorded before the code was simplified (issue 15).

CPU floating point depends on the kernels torch picks for the CPU (AVX2, AVX512, AMX) and on the torch build, so
each value set is recorded for one torch version and one CPU; elsewhere the test skips and says which machines it
pins. To pin a new machine, run this file with RESNET_REPRO_PRINT_PINS=1 at a commit whose numbers you trust and add
the printed entry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    checkpoint_path,
    compose_config,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    train_in_process,
)

# ResNet-20 on the first 256/128 sample images, batch 16, 32 iterations, lr 0.1 divided by 10 at 16 and 24, one thread.
OVERRIDES = [
    "data.batch_size=16", "optim.max_iter=32", "optim.milestones=[16,24]", "trainer.log_every=8",
    "trainer.eval_every=16", "trainer.checkpoint_every=1000", "trainer.channels_last=false", "seed=3",
]
# (torch version, CPU, torch's CPU capability) -> precision -> (train loss, train err, test loss, test err,
# sum of the final weights and buffers, sum of their absolute values). Recorded at commit de9c073, 2026-12-02.
XEON_AMX = ("2.14.1+cu130", "GenuineIntel family 6 model 167 Intel(R) Xeon(R) Processor", "AVX512")
PINS = {
    XEON_AMX: {
        "fp32": (2.2975628674030304, 85.9375, 2.563223123550415, 91.40625, 3668.1233506713497, 18631.985560304398),
        "bf16": (2.383268028497696, 85.9375, 2.3890137672424316, 90.625, 3442.778243582045, 18396.11005734659),
    },
}


def this_machine() -> tuple[str, str, str]:
    """(torch version, CPU vendor/family/model/name from /proc/cpuinfo, torch's CPU capability)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", info, re.MULTILINE)
        return match.group(1).strip() if match else "?"

    cpu = f"{field('vendor_id')} family {field('cpu family')} model {field('model')} {field('model name')}"
    return torch.__version__, cpu, torch.backends.cpu.get_cpu_capability()


def run_numbers(tmp_path: Path, sample_npz: Path, precision: str) -> tuple[float, ...]:
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz", n_train=256, n_test=128)
    cfg = compose_config(data_overrides(npz) + OVERRIDES + [f"trainer.precision={precision}"])
    run_dir = tmp_path / precision
    metrics = train_in_process(cfg, run_dir)
    weights = torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=True)["model"]
    tensors = [t.double() for t in weights.values() if t.is_floating_point()]
    return (
        metrics["final_train_loss"], metrics["final_train_err"], metrics["final_test_loss"],
        metrics["final_test_err"], sum(t.sum().item() for t in tensors), sum(t.abs().sum().item() for t in tensors),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_short_run_numbers_are_pinned(tmp_path, sample_npz, precision):
    machine = this_machine()
    if os.environ.get("RESNET_REPRO_PRINT_PINS"):
        print(f"\n{machine}: {precision!r}: {run_numbers(tmp_path, sample_npz, precision)!r}")
    if machine not in PINS:
        pytest.skip(f"numbers pinned only for {list(PINS)}; this machine is {machine}")
    assert run_numbers(tmp_path, sample_npz, precision) == PINS[machine][precision]
