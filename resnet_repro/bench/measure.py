"""Timing one architecture's configs in interleaved rounds; checkpoint overhead; profiles."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from resnet_repro.bench.baseline import BaselineRunner
from resnet_repro.bench.helpers import slug, sync
from resnet_repro.bench.ours import OursRunner
from resnet_repro.bench.variants import BF16_CPU_MAX_SLOWDOWN, PAPER_ITERATIONS, Planned, arch_name
from resnet_repro.checkpoint import CHECKPOINT_NAME, save_checkpoint
from resnet_repro.data import DeviceData, ImageArrays

log = logging.getLogger(__name__)


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
    on_round: Callable[[list[Row], int], None] | None = None,
) -> tuple[list[Row], Any]:
    """Warm up every runnable config of one arch, then time them in interleaved rounds; returns rows and the
    fastest of our runners (for the checkpoint measurement). `on_round(rows so far, rounds done)` is called after
    each round with summarised copies, so a caller can save what is measured as it comes."""
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
        if on_round is not None and rnd + 1 < args.windows:
            partial = copy.deepcopy(rows)
            _summarise(partial, warm_wall, args, device)
            on_round(partial, rnd + 1)
    _summarise(rows, warm_wall, args, device)
    ours_ok = [r for r in rows if r.status == "ok" and r.ms_per_iter and r.config != "baseline"]
    fastest = min(ours_ok, key=lambda r: r.ms_per_iter) if ours_ok else None
    for key, runner in runners.items():
        if fastest is None or key != fastest.config:
            runner.close()
    return rows, (runners.get(fastest.config), fastest) if fastest else (None, None)


def _summarise(rows: list[Row], warm_wall: dict[str, float], args: argparse.Namespace, device: torch.device) -> None:
    """Medians, throughput, projections and speedups (vs this arch's baseline) from the windows timed so far."""
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
