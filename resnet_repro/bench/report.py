"""Reports: the Figure-6 suite projection, merging reports of one device, Markdown and JSON files."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_repro.bench.concurrency import HOW_TO_SET_K, recommend_k
from resnet_repro.bench.measure import Row
from resnet_repro.bench.variants import BASELINE_CUDNN_BENCHMARK, FIGURE6_SUITE, OURS_CUDNN_BENCHMARK, PAPER_ITERATIONS
from resnet_repro.checkpoint import atomic_write_bytes


def assemble_report(
    meta: dict[str, Any],
    settings: dict[str, Any],
    rows: list[Row],
    order: list[dict],
    checkpoints: list[dict],
    conc: list[dict],
    profiles: list[str],
    device: torch.device,
) -> dict[str, Any]:
    """The report (the JSON layout): what was measured, with the default K and the Figure-6 suite projection
    computed over `rows` and `conc`."""
    rec = recommend_k(conc, device)
    return {
        "meta": meta,
        "settings": settings,
        "rows": [asdict(r) for r in rows],
        "order": order,
        "checkpoint": checkpoints,
        "concurrency": {
            "config": settings["k_config"],
            "results": conc,
            "recommendation": rec,
            "how_to_set_k": HOW_TO_SET_K,
        },
        "figure6_suite": suite_projection(rows, conc, rec) if device.type == "cuda" else None,
        "profiles": profiles,
    }


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
    partial = [
        f"{path} (after {r['meta']['stage']})" for path, r in zip(paths, reports) if not r["meta"].get("complete", True)
    ]
    meta = {
        **first["meta"],
        "command": " ; ".join(r["meta"]["command"] for r in reports),
        "date": ", ".join(sorted({r["meta"]["date"] for r in reports})),
        "sources": [str(p) for p in paths],
        "complete": not partial,
        "stage": "complete" if not partial else "partial sources: " + "; ".join(partial),
    }
    return assemble_report(
        meta,
        first["settings"],
        [Row(**row) for r in reports for row in r["rows"]],
        [o for r in reports for o in r["order"]],
        [c for r in reports for c in r["checkpoint"]],
        [x for r in reports for x in r["concurrency"]["results"]],
        [p for r in reports for p in r["profiles"]],
        torch.device(first["meta"]["device"]),
    )


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


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable table(s) from the JSON report."""
    m = report["meta"]
    s = report["settings"]
    lines = [
        f"# make bench: typical reproduction vs our runner ({m['device_name']})",
        "",
        *(
            []
            if m.get("complete", True)
            else [
                f"> **Partial report**: the benchmark stopped before it finished (last written: {m['stage']}). "
                "Only what is listed below was measured.",
                "",
            ]
        ),
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
    rows = report["rows"]
    best: list[float | None] = []  # per row: its baseline's best window / its best window
    for i, r in enumerate(rows):
        # the baseline timed beside it: the nearest one before it of its arch (a combined report holds several)
        base = next((b for b in reversed(rows[: i + 1]) if b["arch"] == r["arch"] and b["config"] == "baseline"), None)
        ok = base and base.get("best_ms") and r.get("best_ms")
        best.append(base["best_ms"] / r["best_ms"] if ok else None)
    for r, best_speedup in zip(rows, best, strict=True):
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['label']} | {r['settings']} | {r['status']}: {r['note']} | | | | | | | |")
            continue
        windows = " / ".join(_fmt_ms(w) for w in r["windows_ms"])
        one = f"{_fmt_s(r['one_time_s'])} ({r['one_time_note']})" if r["one_time_s"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['label']} | {r['settings']}{' (' + r['note'] + ')' if r['note'] else ''} | "
            f"{_fmt_ms(r['ms_per_iter'])} | {windows} | "
            f"{_fmt(r['img_per_s'], ',.0f')} | {_fmt_s(r['projected_64k_s'])} | {one} | "
            f"{_fmt(r['speedup'], '.2f')}x | {_fmt(best_speedup, '.2f')}x | "
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
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path, tag: str, echo: bool = True) -> int:
    """Write bench-<tag>.json and .md into `out_dir` atomically (a reader, or a killed benchmark, leaves the
    previous version or the new one) and, if `echo`, print the Markdown; returns the exit status 0."""
    json_path, md_path = out_dir / f"bench-{tag}.json", out_dir / f"bench-{tag}.md"
    markdown = render_markdown(report)
    atomic_write_bytes(json_path, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    atomic_write_bytes(md_path, lambda f: f.write(markdown.encode()))
    if echo:
        print(markdown)
        print(f"wrote {md_path} and {json_path}")
    return 0
