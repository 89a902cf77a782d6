"""Collect finished runs (metrics.json + TensorBoard events) into tidy tables and plain-language verdicts; every
number it reports comes from a run."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_repro.errors import ConfigError
from resnet_repro.paper import paper_result
from resnet_repro.run_dir import FAILED_NAME, METRICS_NAME

log = logging.getLogger(__name__)

ARCH_RANK = {arch: i for i, arch in enumerate(("plain", "resnet", "preact", "bottleneck", "resnet18"))}  # table order
ARCH_NAMES = {"plain": "plain", "resnet": "ResNet", "preact": "pre-act ResNet", "bottleneck": "bottleneck ResNet"}
PAPER_NUMERICS = "fp32, BN over 64 images (128 on two GPUs)"  # He et al. 2015, section 4.2
# Config keys that do not change what a run computes; two finished runs equal in everything else (and in their
# numerics: precision, BN batch) are one run (e.g. ResNet-20 seed 0 of fig6_resnet and of table6), drawn once.
NON_RECIPE_KEYS = ("experiment", "runs_dir", "trainer", "responses", "fail_at_iter")  # fail_at_iter: older runs' key
# With one seed, a final-error gap under this many points is within run-to-run noise (seed-to-seed spread of the
# paper's own ResNet-110: std 0.16 points over 5 runs; shorter schedules scatter more), so no verdict rests on it.
NOISE_POINTS = 0.5

Curve = tuple[np.ndarray, np.ndarray]
Errors = tuple[str, float, float, int]  # model name with its seeds note, mean final train and test error, runs


@dataclass
class Run:
    """One run directory: its metrics.json (or failed.json) and its TensorBoard scalar curves."""

    path: Path
    metrics: dict[str, Any]
    curves: dict[str, Curve] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.metrics.get("status") == "finished"


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories at or below the given paths: those holding metrics.json or failed.json."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"run path {path} is not a directory")
        if (path / METRICS_NAME).is_file() or (path / FAILED_NAME).is_file():
            found.add(path)
        else:
            found.update(p.parent for name in (METRICS_NAME, FAILED_NAME) for p in path.rglob(name))
    return sorted(found)


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """Every scalar tag in the run's event files as (steps, values); a resumed run's repeated steps keep the last."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    curves = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=np.float64)
        last = len(steps) - 1 - np.unique(steps[::-1], return_index=True)[1]
        curves[tag] = steps[last], values[last]
    return curves


def unique_runs(run_dirs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Run directories with same-configuration copies dropped (first kept); returns (kept, [(dropped, kept as)]).
    A run's configuration: its resolved config less NON_RECIPE_KEYS, plus its numerics (bf16 and fp32 are two)."""
    kept: dict[str, Path] = {}
    dropped: list[tuple[Path, Path]] = []
    for run_dir in map(Path, dict.fromkeys(map(str, run_dirs))):
        try:
            metrics = json.loads((run_dir / METRICS_NAME).read_text())
            config = {k: v for k, v in metrics["config"].items() if k not in NON_RECIPE_KEYS}
            recipe = json.dumps({"config": config, "numerics": training_numerics(metrics)}, sort_keys=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            recipe = f"unreadable: {run_dir}"  # never equal to another run's
        if recipe in kept:
            dropped.append((run_dir, kept[recipe]))
        else:
            kept[recipe] = run_dir
    return list(kept.values()), dropped


def load_run(run_dir: str | Path) -> Run:
    """Load one run directory; metrics.json wins over a stale failed.json from an earlier attempt."""
    run_dir = Path(run_dir)
    source = run_dir / METRICS_NAME if (run_dir / METRICS_NAME).is_file() else run_dir / FAILED_NAME
    try:
        metrics = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {source}: {exc}") from exc
    curves = read_curves(run_dir)
    if not curves:
        log.warning("%s: no TensorBoard scalars found", run_dir)
    return Run(run_dir, metrics, curves)


def model_name(arch: str, depth: int | None, shortcut: str | None = None) -> str:
    """Paper-style name: 'plain-20', 'ResNet-56', 'ResNet-56 (B)'; the shortcut is named only when not A."""
    name = ARCH_NAMES.get(arch, arch) + ("" if depth is None else f"-{depth}")
    return name if shortcut in (None, "A") or arch == "plain" else f"{name} ({shortcut})"


def seeds_note(n: int, seed: int | None = None) -> str:
    """Name suffix: '' for one run, ' (mean of 2 seeds)', or ' (seed 0 of 2)' when one seed stands for all."""
    if n == 1:
        return ""
    return f" (mean of {n} seeds)" if seed is None else f" (seed {seed} of {n})"


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, int | None, str], list[Run]]:
    """Finished runs by (arch, depth, shortcut), groups in the paper's order (plain before ResNet, shallow before
    deep), runs by seed."""
    groups: dict[tuple[str, int | None, str], list[Run]] = {}
    for run in sorted((r for r in runs if r.finished), key=lambda r: r.metrics["seed"]):
        groups.setdefault((run.metrics["arch"], run.metrics["depth"], run.metrics["shortcut"]), []).append(run)
    return dict(sorted(groups.items(), key=lambda g: (ARCH_RANK.get(g[0][0], len(ARCH_RANK)), g[0][1] or 0, g[0][2])))


def by_depth(runs: Iterable[Run], arch: str, shortcut: str | None = None) -> dict[int, list[Run]]:
    """Depth → finished runs of one arch and shortcut (None: any, as for plain nets, which have none), by depth."""
    depths: dict[int, list[Run]] = {}
    for (a, depth, s), group in group_runs(runs).items():
        if a == arch and shortcut in (None, s):
            depths.setdefault(depth, []).extend(group)
    return depths


def training_numerics(metrics: dict[str, Any]) -> str:
    """How a run computed, where the paper's recipe leaves it to the hardware: arithmetic precision and the
    number of images each BN layer's statistics are taken over, e.g. 'bf16 autocast, BN over 128 images'."""
    precision = metrics.get("precision", "?")
    arithmetic = "fp32" if precision == "fp32" else f"{precision} autocast"
    config = metrics.get("config") or {}
    batch = (config.get("data") or {}).get("batch_size")
    group = (config.get("model") or {}).get("bn_group") or 0
    per_process = batch // max(int(metrics.get("world_size") or 1), 1) if batch else None
    images = min(group, per_process) if group and per_process else group or per_process
    return f"{arithmetic}, BN over {images if images else '?'} images"


def runs_table(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per (arch, depth, shortcut): seeds, test-error mean/std/best, params, the paper's number if any."""
    rows = []
    for (arch, depth, shortcut), group in group_runs(runs).items():
        errs = [r.metrics["final_test_err"] for r in group]
        rows.append({
            "arch": arch, "depth": depth, "shortcut": shortcut, "params": group[0].metrics["params"], "n": len(group),
            "seeds": [r.metrics["seed"] for r in group], "mean": statistics.fmean(errs),
            "std": statistics.stdev(errs) if len(errs) > 1 else None, "best": min(errs),  # sample std
            "paper": paper_result(arch, depth, shortcut),
            "data": sorted({r.metrics["data"]["label"] for r in group}),
            "iterations": sorted({r.metrics["iterations"] for r in group}),
            "numerics": sorted({training_numerics(r.metrics) for r in group}),
        })  # fmt: skip
    return rows


def mixed_groups(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Warnings for table rows that pool runs with different data, iteration counts or numerics."""
    return [
        f"{model_name(r['arch'], r['depth'], r['shortcut'])} pools runs with data {r['data']}, "
        f"iterations {r['iterations']} and numerics {r['numerics']}; its mean mixes unlike runs."
        for r in rows
        if len(r["data"]) > 1 or len(r["iterations"]) > 1 or len(r["numerics"]) > 1
    ]


def _final_errors(runs: Iterable[Run], arch: str, shortcut: str | None = None) -> dict[int, Errors]:
    """Depth → Errors for one arch and shortcut (None: any, as for plain nets)."""
    errors = {}
    for depth, group in by_depth(runs, arch, shortcut).items():
        train, test = ([r.metrics[f"final_{split}_err"] for r in group] for split in ("train", "test"))
        name = model_name(arch, depth, shortcut) + seeds_note(len(group))
        errors[depth] = name, statistics.fmean(train), statistics.fmean(test), len(group)
    return errors


def _compared(a: Errors, b: Errors, word: str, headlines: Sequence[str], at: str = "") -> str:
    """'<headline><at>: <a> ends with <word> final training error (x% vs y%) and <word> final test error (...) than
    <b>.', headlines[k] when k of the two errors are `word` ('higher'/'lower'); with one seed a gap under NOISE_POINTS
    is called noise, never a finding."""
    words = []
    for x, y in zip(a[1:3], b[1:3]):
        if min(a[3], b[3]) == 1 and abs(x - y) < NOISE_POINTS:
            words.append(f"{'higher' if x > y else 'lower' if x < y else 'equal'} (within noise)")
        else:
            words.append(word if (x > y if word == "higher" else x < y) else f"not {word}")
    beats, noise = words.count(word), sum(w.endswith("(within noise)") for w in words)
    headline = f"Within noise (one seed, gap under {NOISE_POINTS} points)" if noise and beats + noise == 2 else ""
    return (
        f"{headline or headlines[beats]}{at}: {a[0]} ends with {words[0]} final training error ({a[1]:.2f}% vs "
        f"{b[1]:.2f}%) and {words[1]} final test error ({a[2]:.2f}% vs {b[2]:.2f}%) than {b[0]}."
    )


def degradation_verdict(runs: Sequence[Run]) -> list[str]:
    """Sentences on degradation (deeper plain net worse on train and test), on ResNet vs plain at equal depth, and on
    deeper vs shallower ResNets (the paper's Table 6: error falls with depth, 8.75 % at 20 to 6.97 % at 56)."""
    plain = _final_errors(runs, "plain")
    degraded = ("No degradation", "No degradation", "Degradation")
    sentences = [_compared(plain[deep], plain[low], "higher", degraded) for low, deep in combinations(plain, 2)]
    if len(plain) < 2:
        sentences.append("Fewer than two plain depths finished, so degradation cannot be assessed.")
    helps = [f"Residual learning {h}" for h in ("does not help", "helps partly", "helps")]
    for shortcut in sorted({s for a, _, s in group_runs(runs) if a == "resnet"}):
        resnet = _final_errors(runs, "resnet", shortcut)
        depths = sorted(set(resnet) & set(plain))
        sentences += [_compared(resnet[d], plain[d], "lower", helps, f" at depth {d}") for d in depths]
        deeper = ("Deeper ResNet not better (unlike the paper)", "Deeper ResNet partly better", "Deeper ResNet better")
        sentences += [_compared(resnet[deep], resnet[low], "lower", deeper) for low, deep in combinations(resnet, 2)]
    return sentences


def _span(values: Iterable[Any]) -> str:
    """Distinct values joined for a provenance line ('-' when none)."""
    distinct = sorted({str(v) for v in values if v is not None})
    return ", ".join(distinct) if distinct else "-"


def provenance(runs: Sequence[Run]) -> dict[str, str]:
    """Where the finished runs' numbers came from, taken verbatim from their metrics.json."""
    done = [r.metrics for r in runs if r.finished]
    versions = [m.get("versions") or {} for m in done]
    dates = sorted(m["date"] for m in done if m.get("date"))
    return {
        "data": _span(m["data"]["label"] for m in done),
        "iterations": _span(f"{m['iterations']:,} of {m['max_iter']:,}" for m in done),
        "devices": _span(m.get("device") for m in done),
        "numerics": f"{_span(training_numerics(m) for m in done)} (paper: {PAPER_NUMERICS})",
        **{key: _span(v.get(key) for v in versions) for key in ("torch", "cuda", "cudnn", "git_sha")},
        "dates": f"{dates[0]} to {dates[-1]}" if dates else "-",
        "runs": f"{len(done)} finished, {len(runs) - len(done)} failed",
    }


def data_description(runs: Sequence[Run]) -> str:
    """Title text from the runs: data label(s) and iteration count(s), e.g. 'CIFAR-10, 64,000 iterations'."""
    done = [r.metrics for r in runs if r.finished]
    labels = "; ".join(sorted({m["data"]["label"] for m in done}))
    iters = sorted({m["iterations"] for m in done})
    span = f"{iters[0]:,}" if len(iters) == 1 else f"{iters[0]:,}–{iters[-1]:,}"
    return f"{labels}, {span} iterations"
