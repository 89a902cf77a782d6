"""The timings: one arch's rows interleaved in rounds on one device, and K processes training there at once."""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from resnet_repro.bench.rows import RECIPE, Row, Runner, make_runner, skip_reason
from resnet_repro.data import ImageArrays
from resnet_repro.device import use_cuda_device

log = logging.getLogger(__name__)


def random_cifar(n_train: int, n_test: int, seed: int = 0) -> ImageArrays:
    """Random uint8 images of CIFAR-10 shape (N, 32, 32, 3) and labels 0..9 (throughput ignores pixel values)."""
    g = torch.Generator().manual_seed(seed)
    return ImageArrays(
        x_train=torch.randint(0, 256, (n_train, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.randint(0, 256, (n_test, 32, 32, 3), dtype=torch.uint8, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        label=f"random uint8 ({n_train} train)",
    )


@dataclass
class Result:
    """One (arch, row) line of the report; ms_per_iter is the median window, speedup is vs the baseline's."""

    arch: str
    row: Row
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    build_s: float = 0.0  # wall time to build the runner and run its warm-up iterations
    windows_ms: list[float] = field(default_factory=list)  # ms/iter of each timed window, in run order
    ms_per_iter: float | None = None
    img_per_s: float | None = None
    projected_64k_s: float | None = None
    one_time_s: float | None = None  # build_s minus the warm-up iterations at ms_per_iter: compile, capture, workers
    speedup: float | None = None


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(runner: Runner, iters: int, device: torch.device) -> float:
    """ms per iteration over `iters` iterations, the device synchronised at both ends."""
    sync(device)
    began = time.perf_counter()
    runner.run(iters)
    sync(device)
    return 1000.0 * (time.perf_counter() - began) / iters


def start(r: Result, opts: argparse.Namespace, device: torch.device, arrays: ImageArrays) -> Runner | None:
    """The row's runner, built and warmed up (taking `r.build_s`), or None when the row cannot run (`r` says why)."""
    if note := skip_reason(r.row, device, opts.batch_size):
        r.status, r.note = "skipped", note
        return None
    began = time.perf_counter()
    try:
        runner = make_runner(r.row, r.arch, arrays, device, opts.batch_size, opts.workers)
        runner.run(opts.warmup)
        sync(device)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported, the others go on
        log.error("%s %s failed", r.arch, r.row.key, exc_info=exc)
        r.status, r.note = "failed", f"{type(exc).__name__}: {exc}"[:300]
        return None
    r.build_s = time.perf_counter() - began
    return runner


def summarise(results: list[Result], opts: argparse.Namespace) -> None:
    """Median ms/iter, img/s, 64k projection, one-time cost and speedup vs the baseline, from the windows so far."""
    timed = [r for r in results if r.windows_ms]
    for r in timed:
        r.ms_per_iter = statistics.median(r.windows_ms)
        r.img_per_s = opts.batch_size * 1000.0 / r.ms_per_iter
        r.projected_64k_s = r.ms_per_iter * RECIPE.max_iter / 1000.0
        r.one_time_s = max(0.0, r.build_s - opts.warmup * r.ms_per_iter / 1000.0)
    base = next((r.ms_per_iter for r in timed if r.row.key == "baseline"), None)
    for r in timed:
        r.speedup = base / r.ms_per_iter if base else None


def measure_arch(spec: str, rows: list[Row], opts: argparse.Namespace, device: torch.device, arrays: ImageArrays,
                 results: list[Result], save: Callable[[str], object]) -> None:  # fmt: skip
    """Warm up the rows of arch `spec` (e.g. resnet-20) in table order, then time each once per round, saving after
    every round."""
    mine = [Result(spec, row) for row in rows]
    results += mine
    runners = {r.row.key: runner for r in mine if (runner := start(r, opts, device, arrays))}
    for done in range(1, opts.windows + 1):
        for r in (r for r in mine if r.row.key in runners):
            r.windows_ms.append(time_window(runners[r.row.key], opts.iters, device))
            log.info("%s round %d %-9s %9.2f ms/iter", r.arch, done, r.row.key, r.windows_ms[-1])
        summarise(mine, opts)
        save(f"{done} of {opts.windows} rounds of {spec}")


def k_worker(seed: int, opts: argparse.Namespace, row: Row, spec: str, device: torch.device, threads: int,
             ready: Any, answers: Any) -> None:  # fmt: skip
    """One of the K processes: build and warm up, wait for all K, train; answers (start, end)."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        use_cuda_device(device)
    runner = make_runner(row, spec, random_cifar(opts.k_num_images, 8, seed), device, opts.batch_size, 0)
    runner.run(opts.warmup)
    sync(device)
    ready.wait()
    began = time.monotonic()
    runner.run(opts.k_iters)
    sync(device)
    answers.put((began, time.monotonic()))


def measure_k(spec: str, k: int, row: Row, opts: argparse.Namespace, device: torch.device) -> dict:
    """Aggregate img/s of `k` processes training `row`, started together when all are warm: first start to last end.
    torch.multiprocessing.spawn starts fresh interpreters (a process that uses CUDA cannot be forked), ends them all
    when one fails and raises its error; each one ends if this process does."""
    threads = (opts.threads or max(1, (os.cpu_count() or 1) // k)) if device.type == "cpu" else 1
    ctx = mp.get_context("spawn")
    ready, answers = ctx.Barrier(k), ctx.SimpleQueue()
    entry = {"arch": spec, "row": row.key, "k": k, "threads_per_process": threads}
    try:
        torch.multiprocessing.spawn(k_worker, (opts, row, spec, device, threads, ready, answers), k, daemon=True)
    except Exception as exc:  # noqa: BLE001 - reported: the last line of the failed process's traceback
        return {**entry, "status": "failed", "note": str(exc).strip().splitlines()[-1][:500]}
    said = [answers.get() for _ in range(k)]
    wall = max(end for _, end in said) - min(began for began, _ in said)
    return {**entry, "status": "ok", "wall_s": wall, "img_per_s": k * opts.k_iters * opts.batch_size / wall}
