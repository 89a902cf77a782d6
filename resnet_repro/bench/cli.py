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
import json
import logging
import os
import platform
import resource
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from resnet_repro.bench.concurrency import KSettings, measure_concurrency, worker_main
from resnet_repro.bench.helpers import random_cifar, slug
from resnet_repro.bench.measure import Row, measure_arch, measure_checkpoint, profile_runner
from resnet_repro.bench.report import assemble_report, combine_reports, write_report
from resnet_repro.bench.variants import (
    BASELINE_CUDNN_BENCHMARK,
    OURS_CUDNN_BENCHMARK,
    arch_name,
    parse_arch,
    plan_variants,
)
from resnet_repro.models import build_model, count_parameters
from resnet_repro.tracking import environment_info, git_sha, now_iso


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
    """auto -> cuda if available else cpu; a CUDA device always with its index (`torch.cuda.set_device` needs it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
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
    tag = args.tag or ("cpu" if device.type == "cpu" else slug(env["device"]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    only = [c for c in args.configs.split(",") if c] if args.configs else None
    plan = plan_variants(device, args.compile_on_cpu, only, args.batch_size)
    ours_keys = [p.variant.key for p in plan_variants(device, True) if p.variant.pipeline == "ours"]
    if args.k_config not in ours_keys:
        raise SystemExit(f"--k-config {args.k_config!r}: one of {ours_keys}")
    arches = [parse_arch(a) for a in args.arches.split(",") if a.strip()]
    arrays = random_cifar(args.num_images, 1000 if device.type == "cuda" else 200)
    settings = {
        **{k: v for k, v in vars(args).items() if k != "worker"},
        "pin_memory": device.type == "cuda",
        "baseline_cudnn_benchmark": BASELINE_CUDNN_BENCHMARK,
        "ours_cudnn_benchmark": OURS_CUDNN_BENCHMARK,
        "params": {arch_name(a, d): count_parameters(build_model(a, d)) for a, d in arches},
    }
    order: list[dict] = []
    rows: list[Row] = []
    checkpoints: list[dict] = []
    profiles: list[str] = []
    conc_results: list[dict] = []

    def save(stage: str, conc: list[dict], more_rows: Sequence[Row] = (), complete: bool = False) -> int:
        """Write the report of what is measured so far (after every round, arch and K: a benchmark killed by a
        time limit keeps what it finished)."""
        meta = run_meta(argv, device, env, loadavg_before, complete, stage)
        report = assemble_report(meta, settings, [*rows, *more_rows], order, checkpoints, conc, profiles, device)
        return write_report(report, out_dir, tag, echo=complete)

    for arch, depth in arches:
        name = arch_name(arch, depth)
        arch_rows, (fast_runner, fast_row) = measure_arch(
            arch,
            depth,
            plan,
            args,
            device,
            arrays,
            order,
            on_round=lambda part, done, name=name: save(
                f"{done} of {args.windows} rounds of {name}", conc_results, part
            ),
        )
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
        save(f"the {name} rows", conc_results)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if ks:
        with tempfile.TemporaryDirectory(prefix="bench-k-") as tmp:
            for spec in [a for a in args.k_arches.split(",") if a.strip()]:
                arch, depth = parse_arch(spec)
                name = arch_name(arch, depth)
                conc_results += measure_concurrency(
                    arch,
                    depth,
                    ks,
                    KSettings.from_args(args),
                    device,
                    args.k_config,
                    Path(tmp),
                    on_result=lambda part, name=name, earlier=list(conc_results): save(
                        f"K={part[-1]['k']} of {name}", earlier + part
                    ),
                )
    return save("complete", conc_results, complete=True)


def run_meta(
    argv: list[str],
    device: torch.device,
    env: dict,
    loadavg_before: list[float],
    complete: bool,
    stage: str,
) -> dict:
    """Provenance of a report: device, versions, git, date, command, machine load; `complete`/`stage` say
    whether the benchmark finished or what it had finished when this was written."""
    import torchvision

    return {
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
        "complete": complete,
        "stage": stage,
    }
