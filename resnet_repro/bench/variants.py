"""What `make bench` compares: the paper's schedule constants, the baseline and our cumulative speed features."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

PAPER_ITERATIONS = 64_000  # paper section 4.2: training stops at 64k iterations
BASE_LR, MOMENTUM, WEIGHT_DECAY, MILESTONES, GAMMA = 0.1, 0.9, 1e-4, (32_000, 48_000), 0.1
# The usual public reproductions normalise with these CIFAR-10 channel statistics (the cost is what matters here).
BASELINE_MEAN, BASELINE_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# Typical reproductions set cudnn.benchmark = True; train.py does not set it, so our rows run with torch's default.
BASELINE_CUDNN_BENCHMARK, OURS_CUDNN_BENCHMARK = True, False
BF16_CPU_MAX_SLOWDOWN = 3.0  # on CPU, bf16 rows are skipped if bf16 is more than this many times slower than fp32
FIGURE6_SUITE = (("plain", 20), ("plain", 32), ("plain", 44), ("plain", 56)) + tuple(
    ("resnet", d) for d in (20, 32, 44, 56, 110)
)


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: the baseline pipeline or our step with a set of speed features."""

    key: str
    label: str
    pipeline: str = "ours"  # baseline | ours
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    sgd: str = "foreach"  # default (torch.optim.SGD without flags) | foreach | fused
    compile: bool = False
    graphs: bool = False
    bn_group: int = 0  # ghost-BN group (model.bn_group); 64 = the paper's BN statistics on one GPU

    def settings(self) -> str:
        """Short human description of what this row runs."""
        if self.pipeline == "baseline":
            return "PIL DataLoader, fp32 eager, SGD(default flags), loss.item() every step"
        parts = ["device data+aug", self.precision]
        if self.channels_last:
            parts.append("channels_last")
        parts.append(f"{self.sgd} SGD")
        if self.compile:
            parts.append("torch.compile")
        if self.graphs:
            parts.append("CUDA graph")
        if self.bn_group:
            parts.append(f"ghost BN over {self.bn_group}")
        return ", ".join(parts)


@dataclass
class Planned:
    """A variant and, if it will not run on this device, why."""

    variant: Variant
    skip: str | None = None


def plan_variants(
    device: torch.device, compile_on_cpu: bool, only: list[str] | None = None, batch_size: int = 128
) -> list[Planned]:
    """The baseline and our cumulative speed features, with skip reasons for what this device (or batch size)
    cannot run."""
    cuda = device.type == "cuda"
    base = Variant("baseline", "baseline (typical reproduction)", pipeline="baseline", sgd="default")
    v1 = Variant("ours-1", "(1) device data + batched aug, foreach SGD")
    v2 = replace(
        v1,
        key="ours-2",
        label="(2) + bf16 autocast" + (" + channels_last" if cuda else ""),
        precision="bf16",
        channels_last=cuda,
    )
    # fused SGD skips a non-finite update on the device; (1) and (2) decide on the host, one sync per step
    v3 = replace(v2, key="ours-3", label="(3) + fused SGD (guard on device: no host sync)", sgd="fused")
    v4 = replace(v3, key="ours-4", label="(4) + torch.compile", compile=True)
    v5 = replace(v4, key="ours-5", label="(5) + CUDA graph (aug+fwd+bwd+SGD)", graphs=True)
    # Not cumulative: (3) + graph without compile, i.e. no per-run compile time (matters for a 9-run suite).
    v5b = replace(v3, key="ours-5b", label="(5b) (3) + CUDA graph, no compile", graphs=True)
    # What the paper's BN statistics (64 images, model.bn_group=64) would cost: README's recipe table, DESIGN.md
    v3g = replace(v3, key="ours-3g", label="(3g) (3) with the paper's BN over 64 images (ghost BN)", bn_group=64)
    v5bg = replace(v5b, key="ours-5bg", label="(5bg) (5b) with the paper's BN over 64 images", bn_group=64)
    plan = [Planned(base), Planned(v1), Planned(v2), Planned(v3)]
    compile_skip = None if cuda or compile_on_cpu else "CUDA only by default (--compile-on-cpu forces it)"
    if not cuda:  # on CUDA (2)-(5) have channels_last already; on CPU its effect is a measurement of its own
        v1cl = replace(v1, key="ours-1cl", label="(1cl) (1) + channels_last (fp32)", channels_last=True)
        v3cl = replace(v3, key="ours-3cl", label="(3cl) (3) + channels_last", channels_last=True)
        v4cl = replace(v3cl, key="ours-4cl", label="(4cl) (3cl) + torch.compile", compile=True)
        # fp32 with compile: where the CPU has no native bf16, fp32 is the only fast precision
        v1c = replace(v1, key="ours-1c", label="(1c) (1) + torch.compile (fp32)", compile=True)
        v1clc = replace(v1cl, key="ours-1clc", label="(1clc) (1cl) + torch.compile (fp32)", compile=True)
        plan += [Planned(v1cl), Planned(v3cl), Planned(v4cl, compile_skip), Planned(v1c, compile_skip)]
        plan.append(Planned(v1clc, compile_skip))
    plan.append(Planned(v4, compile_skip))
    plan.append(Planned(v5, None if cuda else "CUDA only"))
    plan.append(Planned(v5b, None if cuda else "CUDA only"))
    small_batch = batch_size <= v3g.bn_group
    ghost_skip = f"needs a batch above {v3g.bn_group} (--batch-size {batch_size})" if small_batch else None
    plan.append(Planned(v3g, ghost_skip))
    plan.append(Planned(v5bg, ghost_skip if cuda else "CUDA only"))
    if only:
        unknown = sorted(set(only) - {p.variant.key for p in plan})
        if unknown:
            raise SystemExit(f"--configs: unknown {unknown}; valid: {[p.variant.key for p in plan]}")
        plan = [p for p in plan if p.variant.key in only]
    return plan


def parse_arch(spec: str) -> tuple[str, int]:
    """'resnet-20' or 'plain110' -> ('resnet', 20)."""
    m = re.fullmatch(r"([a-z]+)-?(\d+)", spec.strip().lower())
    if not m:
        raise SystemExit(f"--arches: cannot parse {spec!r}; use e.g. resnet-20,resnet-110,plain-110")
    return m.group(1), int(m.group(2))


def arch_name(arch: str, depth: int) -> str:
    """('resnet', 20) -> 'ResNet-20'."""
    return {"resnet": "ResNet", "plain": "plain"}.get(arch, arch) + f"-{depth}"
