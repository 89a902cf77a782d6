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
from resnet_repro.run_files import FAILED_NAME, METRICS_NAME

log = logging.getLogger(__name__)

ARCH_ORDER = ("plain", "resnet", "preact", "bottleneck", "resnet18")
ARCH_NAMES = {"plain": "plain", "resnet": "ResNet", "preact": "pre-act ResNet", "bottleneck": "bottleneck ResNet"}

Curve = tuple[np.ndarray, np.ndarray]
Errors = tuple[float, float, int]  # mean final train error, mean final test error, number of runs


@dataclass
class Run:
    """One run directory: its metrics.json (or failed.json) and its TensorBoard scalar curves."""

    path: Path
    metrics: dict[str, Any]
    curves: dict[str, Curve] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True when metrics.json says the run finished."""
        return self.metrics.get("status") == "finished"

    @property
    def key(self) -> tuple[str, int | None, str]:
        """The grouping key (arch, depth, shortcut)."""
        return self.metrics["arch"], self.metrics["depth"], self.metrics["shortcut"]


# Config keys that do not change what a run computes; two finished runs equal in everything else (and in their
# numerics: precision, BN batch) are one run (e.g. ResNet-20 seed 0 of fig6_resnet and of table6), drawn once.
NON_RECIPE_KEYS = ("experiment", "runs_dir", "trainer", "responses", "fail_at_iter")  # fail_at_iter: older runs' key


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


def recipe_fingerprint(metrics_path: Path) -> str | None:
    """The run's resolved config without the keys that do not change the computation, plus its numerics (bf16
    and fp32 runs of one config are two runs); None if unreadable."""
    try:
        metrics = json.loads(metrics_path.read_text())
        config = dict(metrics["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for key in NON_RECIPE_KEYS:
        config.pop(key, None)
    return json.dumps({"config": config, "numerics": training_numerics(metrics)}, sort_keys=True)


def unique_runs(run_dirs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Run directories with same-configuration copies dropped (first kept); returns (kept, [(dropped, kept as)])."""
    kept: list[Path] = []
    dropped: list[tuple[Path, Path]] = []
    seen: dict[str, Path] = {}
    for run_dir in map(Path, dict.fromkeys(map(str, run_dirs))):
        fingerprint = recipe_fingerprint(run_dir / METRICS_NAME)
        if fingerprint is not None and fingerprint in seen:
            dropped.append((run_dir, seen[fingerprint]))
            continue
        if fingerprint is not None:
            seen[fingerprint] = run_dir
        kept.append(run_dir)
    return kept, dropped


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


def _sort_key(key: tuple[str, int | None, str]) -> tuple[int, int, str]:
    """Order rows as the paper does: plain before ResNet, shallow before deep."""
    arch, depth, shortcut = key
    rank = ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER)
    return rank, depth or 0, shortcut


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, int | None, str], list[Run]]:
    """Finished runs grouped by (arch, depth, shortcut), groups in table order, runs by seed."""
    groups: dict[tuple[str, int | None, str], list[Run]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault(run.key, []).append(run)
    return {k: sorted(groups[k], key=lambda r: r.metrics["seed"]) for k in sorted(groups, key=_sort_key)}


PAPER_NUMERICS = "fp32, BN over 64 images (128 on two GPUs)"  # He et al. 2015, section 4.2


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
        rows.append(
            {
                "arch": arch,
                "depth": depth,
                "shortcut": shortcut,
                "params": group[0].metrics["params"],
                "n": len(group),
                "seeds": [r.metrics["seed"] for r in group],
                "mean": statistics.fmean(errs),
                "std": statistics.stdev(errs) if len(errs) > 1 else None,  # sample std
                "best": min(errs),
                "paper": paper_result(arch, depth, shortcut),
                "data": sorted({r.metrics["data"]["label"] for r in group}),
                "iterations": sorted({r.metrics["iterations"] for r in group}),
                "numerics": sorted({training_numerics(r.metrics) for r in group}),
            }
        )
    return rows


def mixed_groups(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Warnings for table rows that pool runs with different data, iteration counts or numerics."""
    return [
        f"{model_name(r['arch'], r['depth'], r['shortcut'])} pools runs with data {r['data']}, "
        f"iterations {r['iterations']} and numerics {r['numerics']}; its mean mixes unlike runs."
        for r in rows
        if len(r["data"]) > 1 or len(r["iterations"]) > 1 or len(r["numerics"]) > 1
    ]


def _final_errors(runs: Iterable[Run], arch: str, shortcut: str | None) -> dict[int, Errors]:
    """Depth → (mean final train err, mean final test err, n runs) for one arch (plain: any shortcut)."""
    by_depth: dict[int, list[Run]] = {}
    for run in runs:
        m = run.metrics
        if run.finished and m["arch"] == arch and (shortcut is None or m["shortcut"] == shortcut):
            by_depth.setdefault(m["depth"], []).append(run)
    return {
        depth: (
            statistics.fmean(r.metrics["final_train_err"] for r in group),
            statistics.fmean(r.metrics["final_test_err"] for r in group),
            len(group),
        )
        for depth, group in sorted(by_depth.items())
    }


def seeds_note(n: int, seed: int | None = None) -> str:
    """Name suffix: '' for one run, ' (mean of 2 seeds)', or ' (seed 0 of 2)' when one seed stands for all."""
    if n == 1:
        return ""
    return f" (mean of {n} seeds)" if seed is None else f" (seed {seed} of {n})"


# With one seed, a final-error gap under this many points is within run-to-run noise (seed-to-seed spread of the
# paper's own ResNet-110: std 0.16 points over 5 runs; shorter schedules scatter more), so no verdict rests on it.
NOISE_POINTS = 0.5


def _compare(a: Errors, b: Errors, word: str) -> tuple[int, int, str]:
    """How many of a's final train/test errors are `word` ('higher'/'lower') than b's beyond noise, how many gaps are
    within noise (single-seed comparisons only), and a clause quoting them."""
    sign = 1 if word == "higher" else -1
    one_seed = min(a[2], b[2]) == 1
    words, beats, noise = [], 0, 0
    for x, y in zip(a[:2], b[:2]):
        if one_seed and abs(x - y) < NOISE_POINTS:
            words.append(f"{'higher' if x > y else 'lower' if x < y else 'equal'} (within noise)")
            noise += 1
        elif sign * (x - y) > 0:
            words.append(word)
            beats += 1
        else:
            words.append(f"not {word}")
    clause = (
        f"{words[0]} final training error ({a[0]:.2f}% vs {b[0]:.2f}%) and "
        f"{words[1]} final test error ({a[1]:.2f}% vs {b[1]:.2f}%)"
    )
    return beats, noise, clause


def _headline(beats: int, noise: int, yes: str, partly: str, no: str) -> str:
    """'yes' when both comparisons hold beyond noise; 'Within noise' when what is missing is only noise."""
    if beats == 2:
        return yes
    if beats + noise == 2:
        return f"Within noise (one seed, gap under {NOISE_POINTS} points)"
    return partly if beats == 1 else no


def degradation_verdict(runs: Sequence[Run]) -> list[str]:
    """Sentences on degradation (deeper plain net worse on train and test) and on ResNet vs plain at equal depth;
    with one seed a gap under NOISE_POINTS is called noise, never a finding."""
    plain = _final_errors(runs, "plain", None)
    sentences = []
    for shallow, deep in combinations(sorted(plain), 2):
        beats, noise, clause = _compare(plain[deep], plain[shallow], "higher")
        a = model_name("plain", deep) + seeds_note(plain[deep][2])
        b = model_name("plain", shallow) + seeds_note(plain[shallow][2])
        headline = _headline(beats, noise, "Degradation", "No degradation", "No degradation")
        sentences.append(f"{headline}: {a} ends with {clause} than {b}.")
    if len(plain) < 2:
        sentences.append("Fewer than two plain depths finished, so degradation cannot be assessed.")
    shortcuts = sorted({r.metrics["shortcut"] for r in runs if r.finished and r.metrics["arch"] == "resnet"})
    for shortcut in shortcuts:
        resnet = _final_errors(runs, "resnet", shortcut)
        for depth in sorted(set(resnet) & set(plain)):
            beats, noise, clause = _compare(resnet[depth], plain[depth], "lower")
            a = model_name("resnet", depth, shortcut) + seeds_note(resnet[depth][2])
            b = model_name("plain", depth) + seeds_note(plain[depth][2])
            helps = ("Residual learning helps", "Residual learning helps partly", "Residual learning does not help")
            headline = _headline(beats, noise, *helps)
            sentences.append(f"{headline} at depth {depth}: {a} ends with {clause} than {b}.")
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


def failed_runs(runs: Iterable[Run]) -> list[Run]:
    """Runs without a finished metrics.json (crashed or diverged); never averaged into any table."""
    return [r for r in runs if not r.finished]
