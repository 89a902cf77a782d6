"""`make bench`: a typical PyTorch CIFAR reproduction against our runner's own iteration, timed side by side, and
its report, bench-<tag>.md and .json, rewritten atomically as the measurement goes on."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from resnet_repro.bench.measure import Result, measure_arch, measure_k, random_cifar
from resnet_repro.bench.rows import BY_KEY, select, skip_reason
from resnet_repro.checkpoint import atomic_write_bytes
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
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's; K processes: cores/K)")
    p.add_argument("--out", default="results/bench", help="output directory")
    p.add_argument("--tag", help="file names bench-<tag>.md/.json (default: cpu or the GPU's name)")
    return p.parse_args(argv)


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
    for flag, defaults in OPTIONS.items():
        if getattr(opts, key := flag[2:].replace("-", "_")) is None:
            setattr(opts, key, defaults[1 if device.type == "cuda" else 2])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows, k_row = select(opts.configs), BY_KEY.get(opts.k_config, BY_KEY["baseline"])
    if k_row.key == "baseline" or skip_reason(k_row, device, opts.batch_size):
        raise SystemExit(f"--k-config {opts.k_config}: not one of our rows that runs on {device.type}")
    if min(opts.num_images, opts.k_num_images) < opts.batch_size:
        raise SystemExit("--num-images and --k-num-images must be at least --batch-size")
    env = {**environment_info(device), "device_type": device.type, "cpu_count": os.cpu_count(), "command": command}
    tag = opts.tag or ("cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()))
    results: list[Result] = []
    k_entries: list[dict] = []

    def save(stage: str) -> Path:
        """Rewrite the report with everything measured so far, `stage` naming how far the benchmark got."""
        meta = {**env, "date": now_iso(), "stage": stage, "complete": stage == "complete"}
        report = {"meta": meta, "settings": vars(opts), "rows": [asdict(r) for r in results], "k": k_entries}
        return write_report(report, Path(opts.out), tag)

    arrays = random_cifar(opts.num_images, 8)
    for spec in filter(None, opts.arches.split(",")):
        measure_arch(spec, rows, opts, device, arrays, results, save)
    for spec in filter(None, opts.k_arches.split(",")):
        for k in [int(k) for k in opts.ks.split(",") if k]:
            k_entries.append(measure_k(spec, k, k_row, opts, device))
            save(f"K={k} of {spec}")
    return save("complete")


def table(columns: str, lines: list[list[str]]) -> list[str]:
    """A Markdown table: `columns` split at '|', a trailing ':' right-aligns one; short lines end in empty cells."""
    names = [c.strip() for c in columns.split("|")]
    rule = ["---:" if c.endswith(":") else "---" for c in names]
    padded = [cells + [""] * (len(names) - len(cells)) for cells in ([c.rstrip(":") for c in names], rule, *lines)]
    return [f"| {' | '.join(cells)} |" for cells in padded]


def row_cells(r: dict[str, Any]) -> list[str]:
    """One row of the throughput table (a Result as a dict)."""
    cells = [r["arch"], r["row"]["key"], r["row"]["label"]]
    if r["ms_per_iter"] is None:
        return [*cells, f"{r['status']}: {r['note'] or 'not timed yet'}"]
    windows = " / ".join(f"{ms:,.2f}" for ms in r["windows_ms"])
    speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    return [*cells, f"{r['ms_per_iter']:,.2f}", windows, f"{r['img_per_s']:,.0f}",
            f"{r['projected_64k_s'] / 3600:.2f} h", f"{r['one_time_s']:.1f} s", speedup]  # fmt: skip


def k_section(entries: list[dict[str, Any]]) -> list[str]:
    """The K table: aggregate img/s of K processes at once, and its ratio to K=1's."""
    k1 = {e["arch"]: e["img_per_s"] for e in entries if e["k"] == 1 and e["status"] == "ok"}
    lines = []
    for e in entries:
        lines.append([e["arch"], e["row"], str(e["k"]), str(e["threads_per_process"])])
        if e["status"] != "ok":
            lines[-1].append(f"failed: {e['note']}")
        else:
            vs_k1 = f"{e['img_per_s'] / k1[e['arch']]:.2f}x" if e["arch"] in k1 else "-"
            lines[-1] += [f"{e['wall_s']:.2f} s", f"{e['img_per_s']:,.0f}", vs_k1]
    return [
        "## K processes at once", "",
        "Each trains the row on its own random images; all start together after their warm-ups; aggregate img/s: "
        "all their images over the time from the first start to the last end.", "",
        *table("arch | row | K: | threads/process: | wall: | aggregate img/s: | vs K=1:", lines), "",
        "A sweep trains K runs per GPU with RESNET_REPRO_RUNS_PER_GPU=K (README, Multi-GPU).", "",
    ]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    m, s = report["meta"], report["settings"]
    stopped = f"> **Partial report**: the benchmark stopped after {m['stage']}; only what is below was measured."
    return "\n".join([
        f"# make bench: typical reproduction vs our runner ({m['device']})",
        "",
        *([] if m["complete"] else [stopped, ""]),
        f"- {m['date']}, git `{m['git_sha']}`, torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
        f"Python {m['python']}, {m['threads']} torch threads, {m['cpu_count']} CPU cores, host {m['host']}",
        f"- command: `{m['command']}`",
        f"- batch {s['batch_size']}, {s['windows']} windows x {s['iters']} iterations per row after {s['warmup']} "
        f"warm-up iterations, {s['num_images']} random uint8 CIFAR-shaped images; the baseline's DataLoader: "
        f"{s['workers']} workers; on CUDA, cudnn.benchmark on for every row (as train.py and typical reproductions)",
        "- Rows are timed interleaved in rounds on one device (baseline, (1), (2), ..., then again); windows: each "
        "one's ms/iter in run order; ms/iter: their median; 64k: ms/iter x 64,000; one-time: build and warm-up time "
        "minus the warm-up iterations at ms/iter (compile, graph capture, DataLoader workers); speedup: the "
        "baseline's ms/iter over the row's. train.py runs (3) on CUDA (trainer.compile=true: (4), "
        "trainer.cuda_graphs=true: (5b), both: (5), model.bn_group=64: (3g)), and fp32, contiguous, fused SGD on "
        "the CPU.",
        "",
        *table("arch | row | what it runs | ms/iter: | windows (ms/iter) | img/s: | 64k projected: | one-time: | "
               "speedup:", [row_cells(r) for r in report["rows"]]),
        "",
        *(k_section(report["k"]) if report["k"] else []),
    ])  # fmt: skip


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """Write bench-<tag>.json and .md into `out_dir`, each atomically; returns the Markdown's path."""
    md_path = out_dir / f"bench-{tag}.md"
    atomic_write_bytes(out_dir / f"bench-{tag}.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    atomic_write_bytes(md_path, lambda f: f.write(markdown(report).encode()))
    return md_path
