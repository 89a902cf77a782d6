"""`make bench`: a typical PyTorch CIFAR reproduction against our runner's own iteration, timed side by side."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from resnet_repro.bench.helpers import random_cifar
from resnet_repro.bench.measure import Result, measure_arch, measure_k
from resnet_repro.bench.report import write_report
from resnet_repro.bench.rows import BY_KEY, select, skip_reason
from resnet_repro.config import Device
from resnet_repro.device import device_type, job_device
from resnet_repro.tracking import environment_info, now_iso

OPTIONS = {  # flag: (type, default on CUDA, default on the CPU (minutes on 2 cores), help)
    "--arches": (str, "resnet-20,resnet-56,resnet-110,plain-110", "resnet-20,resnet-56", "comma list, e.g. resnet-20"),
    "--iters": (int, 100, 5, "iterations per timed window"),
    "--windows": (int, 5, 3, "timed windows (rounds) per row"),
    "--warmup": (int, 20, 2, "warm-up iterations per row and per K process"),
    "--num-images": (int, 50_000, 10_000, "random uint8 CIFAR-shaped training images"),
    "--workers": (int, 4, 1, "the baseline's DataLoader workers"),
    "--ks": (str, "1,2,4,8", "1,2", "K values of the K table, comma list ('' skips it)"),
    "--k-arches": (str, "resnet-20,resnet-110", "resnet-20", "arches of the K table"),
    "--k-config": (str, "ours-3", "ours-1", "the row each of the K processes trains"),
    "--k-iters": (int, 1000, 10, "iterations per K process"),
    "--k-num-images": (int, 10_000, 1024, "random training images per K process"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; a flag of OPTIONS left out is None here, its device's default once the device is known."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", choices=[d.value for d in Device], help="as trainer.device")
    for flag, (kind, on_cuda, on_cpu, text) in OPTIONS.items():
        p.add_argument(flag, type=kind, help=f"{text} (default: CUDA {on_cuda}, CPU {on_cpu})")
    p.add_argument("--configs", help=f"rows to time, comma list (default: all of {','.join(BY_KEY)}; bench/rows.py)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--compile-on-cpu", action="store_true", help="run the torch.compile rows on the CPU too")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's; K processes: cores/K)")
    p.add_argument("--out", default="results/bench", help="output directory")
    p.add_argument("--tag", help="file names bench-<tag>.md/.json (default: cpu or the GPU's name)")
    return p.parse_args(argv)


def parse_arch(spec: str) -> tuple[str, int]:
    """'resnet-110' -> ('resnet', 110)."""
    arch, depth = spec.split("-")
    return arch, int(depth)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, take the device as train.py takes it, measure, print the report."""
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # never the CPU silently where GPUs are; a GPU made current, with cuDNN autotuning (typical reproductions too)
    with job_device(device_type(Device(opts.device)), world_size=1, sweeping=False) as device:
        md_path = run(opts, device, f"python scripts/bench.py {shlex.join(argv)}")
    print(md_path.read_text(), f"wrote {md_path} and its .json", sep="\n")
    return 0


def run(opts: argparse.Namespace, device: torch.device, command: str) -> Path:
    """Time the rows of every arch, then the K table, rewriting the report after every round and every K."""
    for flag, (_, on_cuda, on_cpu, _) in OPTIONS.items():
        key = flag[2:].replace("-", "_")
        if getattr(opts, key) is None:
            setattr(opts, key, on_cuda if device.type == "cuda" else on_cpu)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows, k_row = select(opts.configs), BY_KEY.get(opts.k_config, BY_KEY["baseline"])
    if k_row.key == "baseline" or skip_reason(k_row, device, True, opts.batch_size):
        raise SystemExit(f"--k-config {opts.k_config}: not one of our rows that runs on {device.type}")
    if min(opts.num_images, opts.k_num_images) < opts.batch_size:
        raise SystemExit("--num-images and --k-num-images must be at least --batch-size")
    env = {**environment_info(device), "device_type": device.type, "cpu_count": os.cpu_count(), "command": command}
    tag = opts.tag or ("cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()))
    results: list[Result] = []
    k_entries: list[dict] = []

    def save(stage: str) -> Path:
        meta = {**env, "date": now_iso(), "stage": stage, "complete": stage == "complete"}
        report = {"meta": meta, "settings": vars(opts), "rows": [asdict(r) for r in results], "k": k_entries}
        return write_report(report, Path(opts.out), tag)

    arrays, bf16_skip = random_cifar(opts.num_images, 8), None
    for spec in filter(None, opts.arches.split(",")):
        bf16_skip = measure_arch(*parse_arch(spec), rows, opts, device, arrays, results, save, bf16_skip)
    for spec in filter(None, opts.k_arches.split(",")):
        for k in [int(k) for k in opts.ks.split(",") if k]:
            k_entries.append(measure_k(*parse_arch(spec), k, k_row, opts, device))
            save(f"K={k} of {spec}")
    return save("complete")
