"""The rows `make bench` times, as data: the typical reproduction, then our runner with its speed settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resnet_repro.device import cpu_has_native_bf16


@dataclass(frozen=True)
class Row:
    """One timed configuration; `where` it runs: cpu, cuda or both."""

    key: str
    label: str
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    sgd: str = "fused"  # fused | foreach | default (torch.optim.SGD without flags, the baseline's)
    compile: bool = False  # torch.compile the model
    graphs: bool = False  # step.GraphedIteration: the whole iteration in one CUDA graph
    bn_group: int = 0  # ghost BN over this many images (model.bn_group); 64 = the paper's BN statistics
    where: str = "both"


BF16 = {"precision": "bf16", "channels_last": True}
ROWS = (
    Row("baseline", "baseline: PIL DataLoader, fp32 eager, SGD(default flags), loss.item() every step", sgd="default"),
    Row("ours-1", "(1) device data + batched aug, fp32, foreach SGD", sgd="foreach"),
    Row("ours-2", "(2) + bf16 autocast + channels_last", sgd="foreach", **BF16),
    Row("ours-3", "(3) + fused SGD (guard on device: no host sync)", **BF16),
    Row("ours-4", "(4) + torch.compile", compile=True, **BF16),
    Row("ours-5", "(5) + CUDA graph (aug+fwd+bwd+SGD)", compile=True, graphs=True, where="cuda", **BF16),
    Row("ours-5b", "(5b) (3) + CUDA graph, no compile", graphs=True, where="cuda", **BF16),
    Row("ours-3g", "(3g) (3) with the paper's BN over 64 images (ghost BN)", bn_group=64, **BF16),
    Row("ours-5bg", "(5bg) (5b) with the paper's BN over 64 images", graphs=True, bn_group=64, where="cuda", **BF16),
    Row("ours-1cl", "(1cl) (1) + channels_last", channels_last=True, sgd="foreach", where="cpu"),
    Row("ours-1c", "(1c) (1) + torch.compile", sgd="foreach", compile=True, where="cpu"),
    Row("ours-1clc", "(1clc) (1cl) + torch.compile", channels_last=True, sgd="foreach", compile=True, where="cpu"),
)
BY_KEY = {row.key: row for row in ROWS}


def select(keys: str | None) -> list[Row]:
    """The rows named by --configs (a comma list; all when None), in table order."""
    wanted = set(filter(None, keys.split(","))) if keys else set(BY_KEY)
    if wanted - set(BY_KEY):
        raise SystemExit(f"--configs: unknown {sorted(wanted - set(BY_KEY))}; valid: {list(BY_KEY)}")
    return [row for row in ROWS if row.key in wanted]


def skip_reason(row: Row, device: torch.device, compile_on_cpu: bool, batch_size: int) -> str | None:
    """Why `row` does not run on `device` at this batch size; None when it runs."""
    if row.where not in ("both", device.type):
        return f"{row.where.upper()} only"
    if row.compile and device.type == "cpu" and not compile_on_cpu:
        return "CUDA only by default (--compile-on-cpu forces it)"
    if row.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "bf16 is emulated on this CPU (no avx512_bf16 or amx_bf16), several times slower than fp32"
    if row.bn_group and batch_size <= row.bn_group:
        return f"needs a batch above {row.bn_group} (--batch-size {batch_size})"
    return None
