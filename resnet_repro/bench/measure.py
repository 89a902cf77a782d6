"""The timings: one arch's rows interleaved in rounds on one device, and K processes training there at once."""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from resnet_repro.bench.helpers import random_cifar
from resnet_repro.bench.rows import Row, skip_reason
from resnet_repro.bench.runners import RECIPE, Runner, make_runner
from resnet_repro.data import ImageArrays
from resnet_repro.device import use_cuda_device

log = logging.getLogger(__name__)

K_TIMEOUT_S = 1800.0  # how long the K processes may take to warm up and train


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


def start(result: Result, arch: str, depth: int, opts: argparse.Namespace, device: torch.device,
          arrays: ImageArrays) -> Runner | None:  # fmt: skip
    """The row's runner, built and warmed up (the wall time in `result.build_s`); None, the row failed, when that
    raised."""
    began = time.perf_counter()
    try:
        runner = make_runner(result.row, arch, depth, arrays, device, opts.batch_size, opts.workers)
        runner.run(opts.warmup)
        sync(device)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported, the others go on
        log.error("%s %s failed", result.arch, result.row.key, exc_info=exc)
        result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"[:300]
        return None
    result.build_s = time.perf_counter() - began
    return runner


def summarise(results: list[Result], opts: argparse.Namespace) -> None:
    """Median ms/iter, img/s, 64k projection, one-time cost and speedup vs the baseline, from the windows so far."""
    timed = [r for r in results if r.status == "ok" and r.windows_ms]
    for r in timed:
        r.ms_per_iter = statistics.median(r.windows_ms)
        r.img_per_s = opts.batch_size * 1000.0 / r.ms_per_iter
        r.projected_64k_s = r.ms_per_iter * RECIPE.max_iter / 1000.0
        r.one_time_s = max(0.0, r.build_s - opts.warmup * r.ms_per_iter / 1000.0)
    base = next((r.ms_per_iter for r in timed if r.row.key == "baseline"), None)
    for r in timed:
        r.speedup = base / r.ms_per_iter if base else None


def measure_arch(arch: str, depth: int, rows: list[Row], opts: argparse.Namespace, device: torch.device,
                 arrays: ImageArrays, results: list[Result], save: Callable[[str], object]) -> None:  # fmt: skip
    """Warm up this arch's rows in table order, then time each once per round, saving after every round."""
    mine = [Result(f"{arch}-{depth}", row) for row in rows]
    results += mine
    runners: dict[str, Runner] = {}
    for r in mine:
        r.note = skip_reason(r.row, device, opts.compile_on_cpu, opts.batch_size) or ""
        if r.note:
            r.status = "skipped"
        elif (runner := start(r, arch, depth, opts, device, arrays)) is not None:
            runners[r.row.key] = runner
    for done in range(1, opts.windows + 1):
        for r in (r for r in mine if r.row.key in runners):
            r.windows_ms.append(time_window(runners[r.row.key], opts.iters, device))
            log.info("%s round %d %-9s %9.2f ms/iter", r.arch, done, r.row.key, r.windows_ms[-1])
        summarise(mine, opts)
        save(f"{done} of {opts.windows} rounds of {arch}-{depth}")


def k_worker(opts: argparse.Namespace, row: Row, arch: str, depth: int, device: torch.device, threads: int,
             seed: int, go: Any, answers: Any) -> None:  # fmt: skip
    """One of the K processes: build and warm up, say so (None), train when told; answers (start, end) or its error."""
    try:
        torch.set_num_threads(threads)
        if device.type == "cuda":
            use_cuda_device(device)
        runner = make_runner(row, arch, depth, random_cifar(opts.k_num_images, 8, seed), device, opts.batch_size, 0)
        runner.run(opts.warmup)
        sync(device)
        answers.put(None)
        go.recv()  # EOFError, so the process ends, if the parent (the pipe's only writer) is gone
        began = time.monotonic()
        runner.run(opts.k_iters)
        sync(device)
        answers.put((began, time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        answers.put(f"{type(exc).__name__}: {exc}"[:500])


def gather(answers: Any, k: int) -> list[Any]:
    """`k` answers of the K processes, or fewer up to the first error (a string)."""
    said: list[Any] = []
    while len(said) < k and not (said and isinstance(said[-1], str)):
        try:
            said.append(answers.get(timeout=K_TIMEOUT_S))
        except queue.Empty:
            said.append(f"no answer in {K_TIMEOUT_S:.0f} s")
    return said


def measure_k(arch: str, depth: int, k: int, row: Row, opts: argparse.Namespace, device: torch.device) -> dict:
    """Aggregate img/s of `k` processes training `row`, started together when all are warm: first start to last end."""
    threads = (opts.threads or max(1, (os.cpu_count() or 1) // k)) if device.type == "cpu" else 1
    ctx = mp.get_context("spawn")  # a fresh interpreter each: a process that uses CUDA cannot be forked
    answers, pipes = ctx.Queue(), [ctx.Pipe(duplex=False) for _ in range(k)]
    work = [(opts, row, arch, depth, device, threads, seed, go, answers) for seed, (go, _) in enumerate(pipes)]
    procs = [ctx.Process(target=k_worker, args=args, daemon=True) for args in work]
    for p in procs:
        p.start()
    said = gather(answers, k)  # k Nones: all are warm
    if not any(isinstance(s, str) for s in said):
        for _, tell in pipes:
            tell.send("go")
        said = gather(answers, k)
    errors = [s for s in said if isinstance(s, str)]
    for p in procs:
        if errors:
            p.kill()  # nothing it does now is measured
        p.join()
    entry = {"arch": f"{arch}-{depth}", "row": row.key, "k": k, "threads_per_process": threads}
    if errors:
        return {**entry, "status": "failed", "note": errors[0]}
    wall = max(end for _, end in said) - min(began for began, _ in said)
    return {**entry, "status": "ok", "wall_s": wall, "img_per_s": k * opts.k_iters * opts.batch_size / wall}
