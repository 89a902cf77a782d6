"""The report: bench-<tag>.json and bench-<tag>.md, rewritten atomically as the measurement goes on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resnet_repro.checkpoint import atomic_write_bytes

HOW_TO_READ = (
    "Rows are timed interleaved in rounds on one device (baseline, (1), (2), ..., then again); windows: each one's "
    "ms/iter in run order; ms/iter: their median; 64k: ms/iter x 64,000; one-time: build and warm-up time minus the "
    "warm-up iterations at ms/iter (compile, graph capture, DataLoader workers); speedup: the baseline's ms/iter over "
    "the row's. train.py runs (3) on CUDA (trainer.compile=true: (4), trainer.cuda_graphs=true: (5b), both: (5), "
    "model.bn_group=64: (3g)), and fp32, contiguous, fused SGD on the CPU."
)


def row_line(r: dict[str, Any]) -> str:
    """One line of the throughput table."""
    head = f"| {r['arch']} | {r['row']['key']} | {r['row']['label']} |"
    if r["status"] != "ok" or r["ms_per_iter"] is None:
        return f"{head} {r['status']}: {r['note'] or 'not timed yet'} | | | | | |"
    windows = " / ".join(f"{ms:,.2f}" for ms in r["windows_ms"])
    speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    numbers = f"{r['ms_per_iter']:,.2f} | {windows} | {r['img_per_s']:,.0f} | {r['projected_64k_s'] / 3600:.2f} h"
    return f"{head} {numbers} | {r['one_time_s']:.1f} s | {speedup} |"


def k_lines(entries: list[dict[str, Any]]) -> list[str]:
    """The K table: aggregate img/s of K processes at once, and its ratio to K=1's."""
    k1 = {e["arch"]: e["img_per_s"] for e in entries if e["k"] == 1 and e["status"] == "ok"}
    lines = [
        "## K processes at once",
        "",
        "Each trains the row on its own random images; all start together after their warm-ups; aggregate img/s: "
        "all their images over the time from the first start to the last end.",
        "",
        "| arch | row | K | threads/process | wall | aggregate img/s | vs K=1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        head = f"| {e['arch']} | {e['row']} | {e['k']} | {e['threads_per_process']} |"
        if e["status"] != "ok":
            lines.append(f"{head} failed: {e['note']} | | |")
            continue
        vs_k1 = f"{e['img_per_s'] / k1[e['arch']]:.2f}x" if e["arch"] in k1 else "-"
        lines.append(f"{head} {e['wall_s']:.2f} s | {e['img_per_s']:,.0f} | {vs_k1} |")
    return [*lines, "", "A sweep trains K runs per GPU with RESNET_REPRO_RUNS_PER_GPU=K (README, Multi-GPU).", ""]


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
        f"- {HOW_TO_READ}",
        "",
        "| arch | row | what it runs | ms/iter | windows (ms/iter) | img/s | 64k projected | one-time | speedup |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
        *map(row_line, report["rows"]),
        "",
        *(k_lines(report["k"]) if report["k"] else []),
    ])  # fmt: skip


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """Write bench-<tag>.json and .md into `out_dir`, each atomically; returns the Markdown's path."""
    md_path = out_dir / f"bench-{tag}.md"
    atomic_write_bytes(out_dir / f"bench-{tag}.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    atomic_write_bytes(md_path, lambda f: f.write(markdown(report).encode()))
    return md_path
