"""K training processes sharing one device: aggregate throughput and the default K."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resnet_repro.bench.helpers import random_cifar, sync
from resnet_repro.bench.ours import OursRunner
from resnet_repro.bench.variants import OURS_CUDNN_BENCHMARK, arch_name, plan_variants
from resnet_repro.data import DeviceData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KSettings:
    """How each of the K processes trains: iterations, batch, random images, warm-up, CPU threads (0 = cores // K)
    and how long to wait for a worker's answer."""

    iters: int
    batch_size: int = 128
    num_images: int = 10_000
    warmup: int = 20
    threads: int = 0
    timeout_s: float = 900.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KSettings:
        """The K-sweep settings of `make bench`'s command line (bench/cli.py)."""
        return cls(args.k_iters, args.batch_size, args.k_num_images, args.warmup, args.threads, args.k_timeout)


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
    arch: str,
    depth: int,
    ks: list[int],
    settings: KSettings,
    device: torch.device,
    config: str,
    log_dir: Path,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Aggregate img/s of K processes training at once on one device (started together after their warm-ups).
    `on_result(results so far)` is called after each K, so a caller can save what is measured as it comes."""
    results = []
    cores = os.cpu_count() or 1
    for k in ks:
        threads = (settings.threads or max(1, cores // k)) if device.type == "cpu" else 1
        procs, queues, logs = [], [], []
        for j in range(k):
            spec = {
                "device": str(device),
                "arch": arch,
                "depth": depth,
                "config": config,
                "iters": settings.iters,
                "batch_size": settings.batch_size,
                "num_images": settings.num_images,
                "warmup": settings.warmup,
                "seed": j,
                "threads": threads,
            }
            err = open(log_dir / f"k{k}-{j}.log", "w")  # noqa: SIM115 - closed below
            logs.append(err)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            proc = subprocess.Popen(
                [sys.executable, "-m", "resnet_repro.bench", "--worker", json.dumps(spec)],
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
            "iters_per_process": settings.iters,
            "batch_size": settings.batch_size,
        }
        try:
            for q in queues:
                line = q.get(timeout=settings.timeout_s)
                if line != "READY":
                    raise RuntimeError(f"worker did not get ready (said {line!r})")
            for proc in procs:
                proc.stdin.write("GO\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
            outs = []
            for q in queues:
                line = q.get(timeout=settings.timeout_s)
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
        if on_result is not None:
            on_result(results)
    return results


def recommend_k(results: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Smallest K within 10% of the best aggregate throughput, per arch; only from a GPU measurement."""
    if device.type != "cuda":
        return {
            "k": None,
            "why": "not chosen: measured on CPU; on a GPU, RESNET_REPRO_RUNS_PER_GPU=auto measures it",
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
    "Sweeps run K training processes per GPU through Hydra's joblib launcher (configs/hydra/launcher/local.yaml "
    "makes n_jobs = GPUs x K); each job holds a slot of the least-busy GPU until its run ends "
    "(resnet_repro/gpu_slots.py), never more than K per GPU. K = RESNET_REPRO_RUNS_PER_GPU: a number, or auto "
    "(the default), which makes this measurement for ResNet-56 once per kind of GPU, applies the rule above and "
    "caches the decision (resnet_repro/runs_per_gpu.py)."
)
