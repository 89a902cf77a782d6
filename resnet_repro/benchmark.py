"""`make bench`: a typical PyTorch CIFAR reproduction and our runner's step, timed side by side in one process.

The baseline is written from the usual public recipe: a torchvision `CIFAR10`-style dataset of PIL images,
`RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`, `Normalize`, a `DataLoader` with workers
(and pinned memory on CUDA), fp32 eager, `torch.optim.SGD` with default flags, `loss.item()` every step.
Ours is the runner's own iteration (`step.EagerIteration`; `step.GraphedIteration` for the CUDA-graph rows), with
the speed features switched on one at a time, cumulatively. All configurations live in the same process on the
same device; after a warm-up they are timed in rounds (baseline, ours-1, ours-2, ..., then again), so drift of
the machine shows in every row.

Also measured: the time to write `checkpoints/last.pt` per architecture (its share of wall time at the default
checkpoint interval), and the aggregate throughput of K training processes sharing one device.

Random uint8 images of CIFAR shape stand in for CIFAR-10: throughput does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import queue
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_repro.checkpoint import CHECKPOINT_NAME, save_checkpoint
from resnet_repro.data import DeviceData, ImageArrays
from resnet_repro.engine import RunState
from resnet_repro.models import build_model, count_parameters
from resnet_repro.optim import Schedule, make_sgd
from resnet_repro.step import (
    Accumulators,
    EagerIteration,
    GraphedIteration,
    TrainStep,
)
from resnet_repro.tracking import environment_info, git_sha, now_iso

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------- configurations
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
        return ", ".join(parts)


@dataclass
class Planned:
    """A variant and, if it will not run on this device, why."""

    variant: Variant
    skip: str | None = None


def plan_variants(device: torch.device, compile_on_cpu: bool, only: list[str] | None = None) -> list[Planned]:
    """The baseline and our cumulative speed features, with skip reasons for what this device cannot run."""
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
    v3 = replace(v2, key="ours-3", label="(3) + fused SGD", sgd="fused")
    v4 = replace(v3, key="ours-4", label="(4) + torch.compile", compile=True)
    v5 = replace(v4, key="ours-5", label="(5) + CUDA graph (aug+fwd+bwd+SGD)", graphs=True)
    # Not cumulative: (3) + graph without compile, i.e. no per-run compile time (matters for a 9-run suite).
    v5b = replace(v3, key="ours-5b", label="(5b) (3) + CUDA graph, no compile", graphs=True)
    plan = [Planned(base), Planned(v1), Planned(v2), Planned(v3)]
    plan.append(Planned(v4, None if cuda or compile_on_cpu else "CUDA only by default (--compile-on-cpu forces it)"))
    plan.append(Planned(v5, None if cuda else "CUDA only"))
    plan.append(Planned(v5b, None if cuda else "CUDA only"))
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


# ------------------------------------------------------------------------------------------------------ utilities
def random_cifar(n_train: int, n_test: int, seed: int = 0) -> ImageArrays:
    """Random uint8 images of CIFAR-10 shape (N, 32, 32, 3) and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    return ImageArrays(
        x_train=torch.randint(0, 256, (n_train, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.randint(0, 256, (n_test, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        label=f"random uint8 ({n_train} train)",
    )


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages among `tensors` (None entries ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, buffers, gradients and optimizer state."""
    ts = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    for state in optimizer.state.values():
        ts += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts)


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------------------------------- baseline
class PILCIFAR10(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's `__getitem__` over in-memory arrays: uint8 HWC -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable | None) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class BaselineRunner:
    """The typical reproduction's training loop (kuangliu/pytorch-cifar style), timed per iteration."""

    def __init__(
        self, arch: str, depth: int, arrays: ImageArrays, device: torch.device, batch_size: int, workers: int
    ) -> None:
        import torchvision.transforms as T

        self.device = device
        transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(BASELINE_MEAN, BASELINE_STD),
            ]
        )
        dataset = PILCIFAR10(arrays.x_train.numpy(), arrays.y_train.tolist(), transform)
        # drop_last keeps every timed batch full; persistent workers spare the baseline a restart per window.
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
        )
        self.loader_settings = {
            "workers": workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0,
        }
        torch.manual_seed(0)
        self.model = build_model(arch, depth).to(device)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self._it = iter(self.loader)
        self.train_loss, self.correct, self.total = 0.0, 0, 0
        self.one_time_note = "DataLoader workers start + first batches"

    def prepare(self, warmup: int) -> None:
        """Warm-up iterations (start the workers, first cuDNN calls)."""
        self.run(warmup)

    def cudnn_benchmark(self) -> bool:
        """Typical reproductions turn cuDNN autotuning on."""
        return BASELINE_CUDNN_BENCHMARK

    def run(self, iters: int) -> None:
        """`iters` training iterations exactly as a typical reproduction writes them."""
        self.model.train()
        for _ in range(iters):
            try:
                inputs, targets = next(self._it)
            except StopIteration:  # end of an epoch: a typical loop starts the next `for ... in loader`
                self._it = iter(self.loader)
                inputs, targets = next(self._it)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad()
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
            loss.backward()
            self.optimizer.step()
            self.train_loss += loss.item()
            _, predicted = outputs.max(1)
            self.total += targets.size(0)
            self.correct += predicted.eq(targets).sum().item()

    def resident_bytes(self) -> int:
        """Device bytes this configuration keeps between steps (data stays on the host)."""
        return model_state_bytes(self.model, self.optimizer)

    def checkpoint_state(self) -> dict[str, Any]:
        """Not used for the baseline."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the DataLoader workers."""
        del self._it
        self.loader = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------------------- ours
class OursRunner:
    """Our runner's per-iteration work, as `engine.fit` runs it minus logging: the same iteration classes."""

    def __init__(self, arch: str, depth: int, variant: Variant, data: DeviceData, batch_size: int) -> None:
        self.variant, self.batch_size, self.device = variant, batch_size, data.device
        self.data = copy.copy(data)  # shares the image tensors, own epoch-plan cache
        self.data._plans = {}
        torch.manual_seed(0)
        model = build_model(arch, depth)
        fmt = torch.channels_last if variant.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=fmt)
        self.optimizer = make_sgd(self.model, BASE_LR, MOMENTUM, WEIGHT_DECAY, fused=variant.sgd == "fused")
        run_model = torch.compile(self.model) if variant.compile else self.model
        self.step = TrainStep(run_model, self.optimizer, variant.precision, self.device)
        self.schedule = Schedule(BASE_LR, list(MILESTONES), GAMMA)
        self.acc = Accumulators.zeros(self.device, 0)
        self.iteration = 0
        self.iterate: EagerIteration | GraphedIteration = EagerIteration(self.step, self.data, self.acc, batch_size)
        self.one_time_note = {
            (False, False): "first steps",
            (True, False): "compile (forward + backward)",
            (True, True): "compile + graph capture",
            (False, True): "graph capture",
        }[(variant.compile, variant.graphs)]

    @property
    def capture_peak_extra(self) -> int:
        """Device bytes the graph capture needed beyond the model's state (0 without a graph)."""
        return getattr(self.iterate, "capture_peak_extra", 0)

    def cudnn_benchmark(self) -> bool:
        """train.py leaves cuDNN autotuning at torch's default."""
        return OURS_CUDNN_BENCHMARK

    def prepare(self, warmup: int) -> None:
        """Warm-up iterations (compilation happens here), then graph capture for the graph variants."""
        if self.variant.graphs:
            self.run(max(warmup - 3, 1))
            self.iterate = GraphedIteration(self.step, self.data, self.acc, self.batch_size, capture=True)
            self.run(2)
        else:
            self.run(warmup)

    def run(self, iters: int) -> None:
        """`iters` iterations of fit's loop body (no logging, evaluation or checkpoints)."""
        for _ in range(iters):
            self.iterate(self.iteration, self.schedule.lr(self.iteration))
            self.iteration += 1

    def resident_bytes(self) -> int:
        """Device bytes kept between steps: model state plus the device-resident data set."""
        d = self.data
        data_tensors = [d.x_train, d.y_train, d.x_test, d.y_test, d.x_val, d.y_val, d.normalizer.mean]
        return model_state_bytes(self.model, self.optimizer) + tensor_bytes(data_tensors)

    def checkpoint_state(self) -> dict[str, Any]:
        """What `engine.fit` puts in checkpoints/last.pt (same keys, this runner's tensors)."""
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config_fingerprint": "0" * 64,
            "model": self.model.state_dict(),
            "optimizer": self.iterate.optimizer_state(),
            "scaler": {},
            "warmup": {},
            "rng": rng,
            "run_state": RunState(iteration=self.iteration).state_dict(),
            "interval": {
                "loss_sum": self.acc.loss_sum.item(),
                "wrong": self.acc.wrong.item(),
                "seen": self.acc.seen.item(),
            },
        }

    def close(self) -> None:
        """Nothing to stop."""


# ------------------------------------------------------------------------------------------------------- measuring
@dataclass
class Row:
    """One (arch, config) line of the table."""

    arch: str
    config: str
    label: str
    settings: str
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    windows_ms: list[float] = field(default_factory=list)
    windows_cpu_share: list[float] = field(default_factory=list)  # process CPU time / (wall x threads), CPU only
    ms_per_iter: float | None = None
    best_ms: float | None = None  # fastest window: on a shared machine, the least disturbed one
    img_per_s: float | None = None
    projected_64k_s: float | None = None
    one_time_s: float | None = None
    one_time_note: str = ""
    speedup: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_note: str = ""

    def finish(self, batch_size: int, warmup_wall_s: float, warmup_iters: int) -> None:
        """Median, throughput, projection and one-time cost from the recorded windows."""
        self.ms_per_iter = statistics.median(self.windows_ms)
        self.best_ms = min(self.windows_ms)
        self.img_per_s = batch_size * 1000.0 / self.ms_per_iter
        self.projected_64k_s = self.ms_per_iter * PAPER_ITERATIONS / 1000.0
        self.one_time_s = max(0.0, warmup_wall_s - warmup_iters * self.ms_per_iter / 1000.0)


def _set_cudnn(runner) -> None:
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = runner.cudnn_benchmark()


def measure_arch(
    arch: str,
    depth: int,
    plan: list[Planned],
    args: argparse.Namespace,
    device: torch.device,
    arrays: ImageArrays,
    order: list[dict],
) -> tuple[list[Row], Any]:
    """Warm up every runnable config of one arch, then time them in interleaved rounds; returns rows and the
    fastest of our runners (for the checkpoint measurement)."""
    name = arch_name(arch, depth)
    shared = DeviceData(arrays, None, device, "pixel_mean", True, seed=0)
    rows: list[Row] = []
    runners: dict[str, Any] = {}
    warm_wall: dict[str, float] = {}
    bf16_skip: str | None = None
    for p in plan:
        v = p.variant
        if bf16_skip and v.precision == "bf16" and device.type == "cpu":
            v = replace(v, precision="fp32", label=v.label.replace("+ bf16 autocast", "(fp32)"))
        row = Row(name, v.key, v.label, v.settings())
        rows.append(row)
        if p.skip:
            row.status, row.note = "skipped", p.skip
            continue
        attempts = [v] + ([replace(v, compile=False)] if v.graphs and v.compile else [])
        runner = None
        for attempt in attempts:
            try:
                t0 = time.perf_counter()
                if attempt.pipeline == "baseline":
                    runner = BaselineRunner(arch, depth, arrays, device, args.batch_size, args.workers)
                else:
                    runner = OursRunner(arch, depth, attempt, shared, args.batch_size)
                _set_cudnn(runner)
                runner.prepare(args.warmup)
                sync(device)
                warm_wall[v.key] = time.perf_counter() - t0
                row.one_time_note, row.settings = runner.one_time_note, attempt.settings()
                break
            except Exception as exc:  # noqa: BLE001 - a config that cannot run is reported, the others go on
                log.exception("%s %s (%s) failed to start", name, v.key, attempt.settings())
                runner = None
                failure = f"{attempt.settings()}: {type(exc).__name__}: {exc}"[:300]
                row.note = (row.note + "; " if row.note else "") + failure
        if runner is None:
            row.status = "failed"
            continue
        if device.type == "cpu" and v.key == "ours-2" and "ours-1" in runners:
            # Is bf16 usable on this CPU at all? Compare one timed iteration of each after warm-up.
            t_fp32 = _time_window(runners["ours-1"], 2, device)
            t_bf16 = _time_window(runner, 2, device)
            if t_bf16 > BF16_CPU_MAX_SLOWDOWN * t_fp32:
                bf16_skip = f"bf16 on this CPU: {t_bf16:.0f} ms/iter vs fp32 {t_fp32:.0f} (>{BF16_CPU_MAX_SLOWDOWN}x)"
                row.status, row.note = "skipped", bf16_skip
                runner.close()
                continue
        runners[v.key] = runner
    for rnd in range(args.windows):
        for row in rows:
            runner = runners.get(row.config)
            if runner is None or row.status != "ok":
                continue
            _set_cudnn(runner)
            extra = None
            if device.type == "cuda":
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                ms, share = _time_window_share(runner, args.iters, device)
            except Exception as exc:  # noqa: BLE001
                log.exception("%s %s failed", name, row.config)
                row.status, row.note = "failed", f"{type(exc).__name__}: {exc}"[:300]
                continue
            if device.type == "cuda":
                extra = torch.cuda.max_memory_allocated(device) - base
                extra = max(extra, getattr(runner, "capture_peak_extra", 0))
                peak = (extra + runner.resident_bytes()) / 2**20
                row.peak_mem_mb = max(row.peak_mem_mb or 0.0, peak)
            row.windows_ms.append(ms)
            if device.type == "cpu":
                row.windows_cpu_share.append(round(share, 3))
            order.append({"seq": len(order), "arch": name, "config": row.config, "round": rnd, "ms_per_iter": ms})
            log.info("%s round %d %-8s %8.2f ms/iter", name, rnd, row.config, ms)
    baseline_ms = None
    for row in rows:
        if row.status == "ok" and row.windows_ms:
            row.finish(args.batch_size, warm_wall[row.config], args.warmup)
            if row.config == "baseline":
                baseline_ms = row.ms_per_iter
        if device.type == "cuda":
            row.peak_mem_note = (
                "max_memory_allocated in a window - allocated before + own weights/grads/state/data; "
                "CUDA-graph rows: the capture's peak"
            )
        else:
            row.peak_mem_note = "n/a on CPU (process-wide ru_maxrss cannot be split between interleaved configs)"
    for row in rows:
        if baseline_ms and row.ms_per_iter:
            row.speedup = baseline_ms / row.ms_per_iter
    ours_ok = [r for r in rows if r.status == "ok" and r.ms_per_iter and r.config != "baseline"]
    fastest = min(ours_ok, key=lambda r: r.ms_per_iter) if ours_ok else None
    for key, runner in runners.items():
        if fastest is None or key != fastest.config:
            runner.close()
    return rows, (runners.get(fastest.config), fastest) if fastest else (None, None)


def _time_window(runner, iters: int, device: torch.device) -> float:
    """ms/iter of `iters` iterations, device synchronised at both ends."""
    return _time_window_share(runner, iters, device)[0]


def _time_window_share(runner, iters: int, device: torch.device) -> tuple[float, float]:
    """(ms/iter, share of the CPU this process got: process CPU time / (wall time x torch threads))."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    runner.run(iters)
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return 1000.0 * wall / iters, cpu / (wall * torch.get_num_threads())


def default_checkpoint_interval() -> int:
    """`trainer.checkpoint_every`'s default (from the schema; from configs/trainer/default.yaml without Hydra)."""
    try:
        from resnet_repro.config import TrainerConfig  # needs hydra-core, which a bare GPU image may lack
    except ImportError:
        text = (Path(__file__).resolve().parents[1] / "configs" / "trainer" / "default.yaml").read_text()
        return int(re.search(r"^checkpoint_every:\s*(\d+)", text, re.MULTILINE).group(1))
    return TrainerConfig().checkpoint_every


def measure_checkpoint(runner: OursRunner, row: Row, root: Path, repeats: int) -> dict[str, Any]:
    """Time `save_checkpoint` of checkpoints/last.pt (as fit writes it) and its share of wall time."""
    interval = default_checkpoint_interval()
    path = root / slug(row.arch) / "checkpoints" / CHECKPOINT_NAME
    times = []
    try:
        for _ in range(repeats):
            sync(runner.device)
            t0 = time.perf_counter()
            save_checkpoint(path, runner.checkpoint_state())
            times.append(1000.0 * (time.perf_counter() - t0))
        size = path.stat().st_size
    finally:
        shutil.rmtree(root / slug(row.arch), ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only if now empty
    write_ms = statistics.median(times)
    interval_ms = interval * row.ms_per_iter
    return {
        "arch": row.arch,
        "config": row.config,
        "file_bytes": size,
        "write_ms": write_ms,
        "write_ms_all": times,
        "interval_iters": interval,
        "ms_per_iter": row.ms_per_iter,
        "interval_s": interval_ms / 1000.0,
        "overhead_pct": 100.0 * write_ms / (interval_ms + write_ms),
        "per_64k_run_s": (PAPER_ITERATIONS // interval) * write_ms / 1000.0,
        "filesystem_dir": str(root),
    }


def profile_runner(runner, iters: int, device: torch.device, out: Path) -> str:
    """torch.profiler over `iters` iterations; writes the top operators to `out` and returns the table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runner.run(2)
    sync(device)
    with profile(activities=activities) as prof:
        runner.run(iters)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    out.write_text(
        f"# torch.profiler, {iters} iterations of {runner.variant.key} ({runner.variant.settings()})\n{table}\n"
    )
    return table


# ----------------------------------------------------------------------------------- several processes per device
def worker_main(spec: dict[str, Any]) -> None:
    """One of K concurrent training processes: build, warm up, print READY, wait for GO, train, print result."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    arch, depth = spec["arch"], spec["depth"]
    plan = {p.variant.key: p.variant for p in plan_variants(device, True)}
    variant = plan[spec["config"]]
    arrays = random_cifar(spec["num_images"], 100, seed=spec["seed"])
    data = DeviceData(arrays, None, device, "pixel_mean", True, seed=spec["seed"])
    runner = OursRunner(arch, depth, variant, data, spec["batch_size"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = OURS_CUDNN_BENCHMARK
    runner.prepare(spec["warmup"])
    sync(device)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    t0 = time.monotonic()
    runner.run(spec["iters"])
    sync(device)
    t1 = time.monotonic()
    images = spec["iters"] * spec["batch_size"]
    print(json.dumps({"start": t0, "end": t1, "images": images}), flush=True)


def _reader(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.put(line.strip())
    lines.put(None)


def measure_concurrency(
    arch: str, depth: int, ks: list[int], args: argparse.Namespace, device: torch.device, config: str, log_dir: Path
) -> list[dict[str, Any]]:
    """Aggregate img/s of K processes training at once on one device (started together after their warm-ups)."""
    results = []
    cores = os.cpu_count() or 1
    for k in ks:
        threads = (args.threads or max(1, cores // k)) if device.type == "cpu" else 1
        procs, queues, logs = [], [], []
        for j in range(k):
            spec = {
                "device": str(device),
                "arch": arch,
                "depth": depth,
                "config": config,
                "iters": args.k_iters,
                "batch_size": args.batch_size,
                "num_images": args.k_num_images,
                "warmup": args.warmup,
                "seed": j,
                "threads": threads,
            }
            err = open(log_dir / f"k{k}-{j}.log", "w")  # noqa: SIM115 - closed below
            logs.append(err)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            proc = subprocess.Popen(
                [sys.executable, "-m", "resnet_repro.benchmark", "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            q: queue.Queue = queue.Queue()
            threading.Thread(target=_reader, args=(proc, q), daemon=True).start()
            procs.append(proc)
            queues.append(q)
        entry: dict[str, Any] = {
            "arch": arch_name(arch, depth),
            "config": config,
            "k": k,
            "threads_per_process": threads,
            "iters_per_process": args.k_iters,
            "batch_size": args.batch_size,
        }
        try:
            for q in queues:
                line = q.get(timeout=args.k_timeout)
                if line != "READY":
                    raise RuntimeError(f"worker did not get ready (said {line!r})")
            for proc in procs:
                proc.stdin.write("GO\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
            outs = []
            for q in queues:
                line = q.get(timeout=args.k_timeout)
                if not line or not line.startswith("{"):
                    raise RuntimeError(f"worker failed (said {line!r})")
                outs.append(json.loads(line))
            wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
            images = sum(o["images"] for o in outs)
            entry.update(
                status="ok",
                wall_s=wall,
                total_images=images,
                img_per_s=images / wall,
                per_process_img_per_s=[o["images"] / (o["end"] - o["start"]) for o in outs],
                start_spread_s=max(o["start"] for o in outs) - min(o["start"] for o in outs),
            )
        except Exception as exc:  # noqa: BLE001 - report and go on with the next K
            detail = ""
            for j in range(k):
                text = (log_dir / f"k{k}-{j}.log").read_text()[-400:] if (log_dir / f"k{k}-{j}.log").exists() else ""
                if text:
                    detail = text
            entry.update(status="failed", note=f"{type(exc).__name__}: {exc} {detail}"[:500])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()  # type: ignore[union-attr]
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            for f in logs:
                f.close()
        results.append(entry)
        log.info("K=%d %s: %s", k, arch_name(arch, depth), entry.get("img_per_s", entry.get("note")))
    base = next((r["img_per_s"] for r in results if r["k"] == 1 and r.get("status") == "ok"), None)
    for r in results:
        if base and r.get("status") == "ok":
            r["vs_k1"] = r["img_per_s"] / base
    return results


def recommend_k(results: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Smallest K within 10% of the best aggregate throughput, per arch; only from a GPU measurement."""
    if device.type != "cuda":
        return {
            "k": None,
            "why": "not chosen: measured on CPU; the default K must be chosen from a GPU run of make bench",
        }
    per_arch: dict[str, int] = {}
    for arch in sorted({r["arch"] for r in results}):
        ok = [r for r in results if r["arch"] == arch and r.get("status") == "ok"]
        if ok:
            best = max(r["img_per_s"] for r in ok)
            per_arch[arch] = min(r["k"] for r in ok if r["img_per_s"] >= 0.9 * best)
    k = min(per_arch.values()) if per_arch else None
    return {
        "k": k,
        "per_arch": per_arch,
        "why": "smallest K whose aggregate img/s is within 10% of the best measured K (the smallest over archs)",
    }


HOW_TO_SET_K = (
    "Sweeps run K training processes per GPU through Hydra's joblib launcher: set RESNET_REPRO_RUNS_PER_GPU=K "
    "(configs/hydra/launcher/local.yaml makes n_jobs = GPUs x K); each job holds a slot of the least-busy GPU "
    "until its run ends (resnet_repro/gpu_slots.py), never more than K per GPU."
)


# --------------------------------------------------------------------------------------------------------- reports
def combine_reports(paths: list[Path]) -> dict[str, Any]:
    """One report from several of one device (e.g. scripts/gpu_session.sh's per-arch calls): all rows and K
    results, the default K and the Figure-6 suite projection recomputed over them."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--combine: cannot read {path} as a bench report: {exc}") from None
    devices = sorted({r["meta"]["device_name"] for r in reports})
    if len(devices) != 1:
        raise SystemExit(f"--combine: the reports come from different devices {devices}; combine one device's only")
    first = reports[0]
    device = torch.device(first["meta"]["device"])
    rows = [Row(**row) for r in reports for row in r["rows"]]
    conc = [x for r in reports for x in r["concurrency"]["results"]]
    rec = recommend_k(conc, device)
    meta = {
        **first["meta"],
        "command": " ; ".join(r["meta"]["command"] for r in reports),
        "date": ", ".join(sorted({r["meta"]["date"] for r in reports})),
        "sources": [str(p) for p in paths],
    }
    return {
        "meta": meta,
        "settings": first["settings"],
        "rows": [asdict(r) for r in rows],
        "order": [o for r in reports for o in r["order"]],
        "checkpoint": [c for r in reports for c in r["checkpoint"]],
        "concurrency": {
            "config": first["concurrency"]["config"],
            "results": conc,
            "recommendation": rec,
            "how_to_set_k": HOW_TO_SET_K,
        },
        "figure6_suite": suite_projection(rows, conc, rec) if device.type == "cuda" else None,
        "profiles": [p for r in reports for p in r["profiles"]],
    }


def suite_projection(rows: list[Row], conc: list[dict], rec: dict) -> dict[str, Any] | None:
    """Figure-6 suite (plain 20-56, ResNet 20-110, one seed) projected from the fastest config's ms/iter vs depth."""
    best: dict[int, float] = {}
    for r in rows:
        m = re.fullmatch(r"(ResNet|plain)-(\d+)", r.arch)
        if m and r.status == "ok" and r.config != "baseline" and r.ms_per_iter:
            d = int(m.group(2))
            best[d] = min(best.get(d, float("inf")), r.ms_per_iter)
    if len(best) < 2:
        return None
    depths = np.array(sorted(best))
    slope, intercept = np.polyfit(depths, np.array([best[d] for d in depths]), 1)
    seq_s = sum((intercept + slope * d) * PAPER_ITERATIONS / 1000.0 for _, d in FIGURE6_SUITE)
    out: dict[str, Any] = {
        "ms_per_iter_fit": {"intercept_ms": float(intercept), "slope_ms_per_layer": float(slope)},
        "sequential_s": float(seq_s),
        "runs": len(FIGURE6_SUITE),
    }
    ok = [r for r in conc if r.get("status") == "ok" and r.get("vs_k1")]
    if ok and rec.get("k"):
        gains = [r["vs_k1"] for r in ok if r["k"] == rec["k"]]
        if gains:
            out["k"] = rec["k"]
            out["concurrent_s"] = float(seq_s / min(gains))
    return out


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _fmt_ms(ms: float | None) -> str:
    """Milliseconds with about three significant digits, no exponent."""
    if ms is None:
        return "-"
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The human-readable table(s) from the JSON report."""
    m = report["meta"]
    s = report["settings"]
    lines = [
        f"# make bench: typical reproduction vs our runner ({m['device_name']})",
        "",
        f"- date {m['date']}, git `{m['git_sha']}`, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}, {m['threads']} torch threads, "
        f"{m['cpu_count']} CPU cores, load average before/after {m['loadavg_before']} / {m['loadavg_after']}",
        f"- command: `{m['command']}`",
        f"- batch {s['batch_size']}, {s['windows']} windows x {s['iters']} iterations per config, "
        f"{s['warmup']} warm-up iterations, {s['num_images']} random uint8 CIFAR-shaped images; baseline DataLoader: "
        f"{s['workers']} workers, pin_memory={s['pin_memory']}; cudnn.benchmark baseline={BASELINE_CUDNN_BENCHMARK} "
        f"ours={OURS_CUDNN_BENCHMARK}",
        "- configs are timed interleaved in rounds (baseline, (1), (2), ... then again); `windows` lists each "
        "window's ms/iter in run order, so drift shows. ms/iter = median of the windows; 64k = ms/iter x 64,000; "
        "one-time = warm-up wall time - warm-up iterations x ms/iter (compile, capture, worker start). "
        "best-window speedup = the baseline's fastest window / this config's fastest window (robust to a shared "
        "machine's bursts; the headline is the median).",
        "",
        "- the runner today: train.py on CUDA runs config (3) (bf16 autocast, channels_last, fused SGD; "
        "`trainer.compile=true` gives (4), `trainer.cuda_graphs=true` (5b), both (5)); on CPU it runs fp32, "
        "contiguous, fused SGD. Every row of ours runs the iteration classes of resnet_repro/step.py that fit runs.",
        "",
        "## Throughput",
        "",
        "| arch | config | settings | ms/iter | windows (ms/iter) | img/s | 64k projected | one-time "
        "| speedup vs baseline | best-window speedup | peak mem (MB) |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best: dict[str, dict[str, float]] = {}  # arch -> config -> baseline best window / this config's best window
    for r in report["rows"]:
        base = next((b for b in report["rows"] if b["arch"] == r["arch"] and b["config"] == "baseline"), None)
        if base and base.get("best_ms") and r.get("best_ms"):
            best.setdefault(r["arch"], {})[r["config"]] = base["best_ms"] / r["best_ms"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['label']} | {r['settings']} | {r['status']}: {r['note']} | | | | | | | |")
            continue
        windows = " / ".join(_fmt_ms(w) for w in r["windows_ms"])
        one = f"{_fmt_s(r['one_time_s'])} ({r['one_time_note']})" if r["one_time_s"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['label']} | {r['settings']}{' (' + r['note'] + ')' if r['note'] else ''} | "
            f"{_fmt_ms(r['ms_per_iter'])} | {windows} | "
            f"{_fmt(r['img_per_s'], ',.0f')} | {_fmt_s(r['projected_64k_s'])} | {one} | "
            f"{_fmt(r['speedup'], '.2f')}x | {_fmt(best.get(r['arch'], {}).get(r['config']), '.2f')}x | "
            f"{_fmt(r['peak_mem_mb'], '.0f') if r['peak_mem_mb'] else 'n/a'} |"
        )
    lines += ["", f"Peak memory: {report['rows'][0]['peak_mem_note'] if report['rows'] else ''}.", ""]
    shares = [x for r in report["rows"] for x in r.get("windows_cpu_share", [])]
    if shares:
        lines += [
            f"CPU share of the timed windows (process CPU time / (wall x {m['threads']} threads); 1.0 = this process "
            f"had its threads running the whole time, lower = the machine was shared or threads waited): median "
            f"{statistics.median(shares):.2f}, min {min(shares):.2f}, max {max(shares):.2f}; per window in the JSON "
            "(`windows_cpu_share`). The baseline's DataLoader worker runs in another process and is not counted.",
            "",
        ]
    ck = report.get("checkpoint") or []
    if ck:
        lines += [
            "## Checkpoint overhead (issue 7 item 8)",
            "",
            f"`save_checkpoint` of `checkpoints/last.pt` with fit's contents (model, optimizer, RNG, run state), "
            f"median of {s['ckpt_repeats']} writes into `{ck[0]['filesystem_dir']}` (atomic: temp file, fsync, "
            "rename); "
            "share of wall time at the default interval `trainer.checkpoint_every` x the fastest config's ms/iter.",
            "",
            "| arch | file | write (ms) | interval | ms/iter (config) | interval wall | overhead | per 64k run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in ck:
            lines.append(
                f"| {c['arch']} | {c['file_bytes'] / 2**20:.1f} MiB | {c['write_ms']:.1f} | {c['interval_iters']} it | "
                f"{_fmt_ms(c['ms_per_iter'])} ({c['config']}) | {_fmt_s(c['interval_s'])} | {c['overhead_pct']:.3f}% | "
                f"{c['per_64k_run_s']:.2f} s |"
            )
        lines.append("")
    conc = report.get("concurrency") or {}
    if conc.get("results"):
        lines += [
            "## Several models per device",
            "",
            f"K separate processes, each running our step ({conc['config']}) on its own random data for "
            f"{s['k_iters']} iterations after its warm-up, started together; aggregate img/s = all images / "
            "(last end - first start).",
            "",
            "| arch | K | threads/process | wall | aggregate img/s | per-process img/s | vs K=1 |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in conc["results"]:
            if r.get("status") != "ok":
                lines.append(
                    f"| {r['arch']} | {r['k']} | {r['threads_per_process']} | failed: {r.get('note', '')} | | | |"
                )
                continue
            per = "/".join(f"{x:,.0f}" for x in r["per_process_img_per_s"])
            lines.append(
                f"| {r['arch']} | {r['k']} | {r['threads_per_process']} | {r['wall_s']:.2f} s | {r['img_per_s']:,.0f} "
                f"| {per} | {_fmt(r.get('vs_k1'), '.2f')}x |"
            )
        rec = conc["recommendation"]
        lines += ["", f"Default K: {rec['k'] if rec['k'] else '-'} ({rec['why']}).", "", conc["how_to_set_k"], ""]
    suite = report.get("figure6_suite")
    if suite:
        lines += [
            "## Figure-6 suite projection",
            "",
            f"{suite['runs']} runs (plain 20/32/44/56, ResNet 20/32/44/56/110) x 64k iterations, ms/iter interpolated "
            f"linearly in depth from the fastest measured config ({suite['ms_per_iter_fit']['intercept_ms']:.3g} ms + "
            f"{suite['ms_per_iter_fit']['slope_ms_per_layer']:.3g} ms/layer): one at a time "
            f"{_fmt_s(suite['sequential_s'])}"
            + (f"; with K={suite['k']} per device {_fmt_s(suite['concurrent_s'])}" if "concurrent_s" in suite else "")
            + ". Excludes evaluation and checkpoints.",
            "",
        ]
    if report.get("profiles"):
        lines += ["## Profiles", ""] + [f"- {p}" for p in report["profiles"]] + [""]
    order = report["order"]
    if order:
        lines += ["## Measurement order", ""]
        by_round: dict[tuple[str, int], list[str]] = {}
        for o in order:
            by_round.setdefault((o["arch"], o["round"]), []).append(o["config"])
        for (arch, rnd), configs in by_round.items():
            lines.append(f"- {arch} round {rnd}: {', '.join(configs)}")
        lines.append("")
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults depend on the device (CPU defaults finish in minutes on 2 cores)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--arches",
        default=None,
        help="comma list, e.g. resnet-20,resnet-56,resnet-110,plain-110 "
        "(default: those four on CUDA, resnet-20,resnet-56 on CPU)",
    )
    p.add_argument("--configs", default=None, help="subset of baseline,ours-1,...,ours-5,ours-5b (default: all)")
    p.add_argument("--iters", type=int, default=None, help="iterations per timed window (CUDA 100, CPU 5)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (rounds) per config (CUDA 5, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per config (CUDA 20, CPU 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-images", type=int, default=None, help="random training images (CUDA 50000, CPU 10000)")
    p.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers (CUDA 4, CPU 1)")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the torch.compile row on CPU too")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads on CPU, also per K-sweep process (0 = torch default; K sweep: cores // K)",
    )
    p.add_argument(
        "--ks", default=None, help="K values for the several-processes sweep (CUDA 1,2,4,8; CPU 1,2); '' skips it"
    )
    p.add_argument("--k-arches", default=None, help="arches for the K sweep (CUDA resnet-20,resnet-110; CPU resnet-20)")
    p.add_argument("--k-config", default="ours-3", help="config each of the K processes runs")
    p.add_argument(
        "--k-iters", type=int, default=None, help="iterations per process in the K sweep (CUDA 1000, CPU 10)"
    )
    p.add_argument("--k-num-images", type=int, default=None, help="images per K-sweep process (CUDA 10000, CPU 1024)")
    p.add_argument("--k-timeout", type=float, default=900.0, help="seconds to wait for a K-sweep worker's answer")
    p.add_argument("--ckpt-repeats", type=int, default=5, help="checkpoint writes timed per arch")
    p.add_argument("--ckpt-dir", default="runs/_bench", help="where the timed checkpoints are written (then deleted)")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint-overhead measurement")
    p.add_argument("--profile", action="store_true", help="also torch.profiler the fastest config of each arch")
    p.add_argument("--out", default="results/bench", help="output directory")
    p.add_argument("--tag", default=None, help="file name tag: bench-<tag>.md/.json (default: cpu or the GPU name)")
    p.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON", help="merge earlier reports of one device instead"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the device-dependent defaults in place."""
    cuda = device.type == "cuda"
    defaults = {
        "arches": "resnet-20,resnet-56,resnet-110,plain-110" if cuda else "resnet-20,resnet-56",
        "iters": 100 if cuda else 5,
        "windows": 5 if cuda else 3,
        "warmup": 20 if cuda else 2,
        "num_images": 50_000 if cuda else 10_000,
        "workers": 4 if cuda else 1,
        "ks": "1,2,4,8" if cuda else "1,2",
        "k_arches": "resnet-20,resnet-110" if cuda else "resnet-20",
        "k_iters": 1000 if cuda else 10,
        "k_num_images": 10_000 if cuda else 1024,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_images < args.batch_size or args.k_num_images < args.batch_size:
        raise SystemExit("--num-images and --k-num-images must be at least --batch-size")


def pick_device(name: str) -> torch.device:
    """auto -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return device


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write results/bench/bench-<tag>.md and .json."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.combine:
        return write_report(combine_reports([Path(p) for p in args.combine]), Path(args.out), args.tag or "combined")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resolve_defaults(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    env = environment_info(device)
    import torchvision

    tag = args.tag or ("cpu" if device.type == "cpu" else slug(env["device"]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    only = [c for c in args.configs.split(",") if c] if args.configs else None
    plan = plan_variants(device, args.compile_on_cpu, only)
    ours_keys = [p.variant.key for p in plan_variants(device, True) if p.variant.pipeline == "ours"]
    if args.k_config not in ours_keys:
        raise SystemExit(f"--k-config {args.k_config!r}: one of {ours_keys}")
    arches = [parse_arch(a) for a in args.arches.split(",") if a.strip()]
    arrays = random_cifar(args.num_images, 1000 if device.type == "cuda" else 200)
    order: list[dict] = []
    rows: list[Row] = []
    checkpoints: list[dict] = []
    profiles: list[str] = []
    for arch, depth in arches:
        arch_rows, (fast_runner, fast_row) = measure_arch(arch, depth, plan, args, device, arrays, order)
        rows += arch_rows
        if fast_runner is not None and not args.no_checkpoint:
            checkpoints.append(measure_checkpoint(fast_runner, fast_row, Path(args.ckpt_dir), args.ckpt_repeats))
        if fast_runner is not None and args.profile:
            path = out_dir / f"profile-{tag}-{slug(fast_row.arch)}.txt"
            profile_runner(fast_runner, min(args.iters, 20), device, path)
            profiles.append(str(path))
        del fast_runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    conc_results: list[dict] = []
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if ks:
        with tempfile.TemporaryDirectory(prefix="bench-k-") as tmp:
            for spec in [a for a in args.k_arches.split(",") if a.strip()]:
                arch, depth = parse_arch(spec)
                conc_results += measure_concurrency(arch, depth, ks, args, device, args.k_config, Path(tmp))
    rec = recommend_k(conc_results, device)
    report = {
        "meta": {
            "device": str(device),
            "device_name": env["device"],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "cudnn": env["cudnn"],
            "python": platform.python_version(),
            "git_sha": git_sha() or env["git_sha"],
            "date": now_iso(),
            "command": "python scripts/bench.py " + " ".join(shlex.quote(a) for a in argv),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "host": env["host"],
            "loadavg_before": loadavg_before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        },
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "worker"},
            "pin_memory": device.type == "cuda",
            "baseline_cudnn_benchmark": BASELINE_CUDNN_BENCHMARK,
            "ours_cudnn_benchmark": OURS_CUDNN_BENCHMARK,
            "params": {arch_name(a, d): count_parameters(build_model(a, d)) for a, d in arches},
        },
        "rows": [asdict(r) for r in rows],
        "order": order,
        "checkpoint": checkpoints,
        "concurrency": {
            "config": args.k_config,
            "results": conc_results,
            "recommendation": rec,
            "how_to_set_k": HOW_TO_SET_K,
        },
        "figure6_suite": suite_projection(rows, conc_results, rec) if device.type == "cuda" else None,
        "profiles": profiles,
    }
    return write_report(report, out_dir, tag)


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> int:
    """Write bench-<tag>.json and .md into `out_dir` and print the Markdown; returns the exit status 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"bench-{tag}.json", out_dir / f"bench-{tag}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, md_path)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
