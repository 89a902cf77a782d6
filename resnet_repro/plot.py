"""Draw the paper's Figure 6 and Figure 7 and write Table 6 and the verdict from finished run directories.

python -m resnet_repro.plot runs/cifar-10/fig6_plain runs/cifar-10/fig6_resnet --out results/fig6 [--title-suffix "..."]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import reduce
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from resnet_repro.errors import ConfigError  # noqa: E402
from resnet_repro.paper import CITATION, SOURCE  # noqa: E402
from resnet_repro.results import (  # noqa: E402
    PAPER_NUMERICS,
    Curve,
    Run,
    data_description,
    degradation_verdict,
    failed_runs,
    find_runs,
    group_runs,
    load_run,
    mixed_groups,
    model_name,
    provenance,
    runs_table,
    seeds_note,
    unique_runs,
)

log = logging.getLogger(__name__)

PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)
SHORTCUTS = ("A", "B", "C")
FIG7_MAX_DEPTH = 110  # the paper's Figure 7 shows depths 20-110; 1202 layers would flatten every other line
FigKey = tuple[str, int]
# Figure 6's panels: title and which (arch, depth) it shows.
FIG6_PANELS: tuple[tuple[str, Callable[[FigKey], bool]], ...] = (
    ("plain", lambda k: k[0] == "plain"),
    ("ResNet (option A)", lambda k: k[0] == "resnet" and k[1] <= 110),
    ("deep ResNet (option A): 110 and 1202", lambda k: k[0] == "resnet" and k[1] >= 110),
)


def depth_colours(depths: Sequence[int]) -> dict[int, Any]:
    """One colour per depth, the same in every panel and figure; the paper's depths keep fixed colours."""
    palette = plt.get_cmap("tab10").colors
    extra = sorted(set(depths) - set(PAPER_DEPTHS))
    colours = {d: palette[i] for i, d in enumerate(PAPER_DEPTHS)}
    colours.update({d: palette[(len(PAPER_DEPTHS) + i) % len(palette)] for i, d in enumerate(extra)})
    return colours


def figure_groups(runs: Sequence[Run]) -> dict[FigKey, list[Run]]:
    """Finished plain nets (any shortcut: they have none) and option-A ResNets by (arch, depth), in table order."""
    groups: dict[FigKey, list[Run]] = {}
    for (arch, depth, shortcut), group in group_runs(runs).items():
        if arch == "plain" or (arch == "resnet" and shortcut == "A"):
            groups.setdefault((arch, depth), []).extend(group)
    return groups


def mean_curve(group: Sequence[Run], tag: str) -> tuple[Curve | None, str]:
    """The seeds' mean curve on their common steps, else the first seed's curve; with its legend note."""
    have = [r for r in group if tag in r.curves]
    if not have:
        return None, ""
    common = reduce(np.intersect1d, (r.curves[tag][0] for r in have))
    if len(have) < len(group) or len(common) == 0:
        return have[0].curves[tag], seeds_note(len(group), have[0].metrics["seed"])
    values = [vals[np.searchsorted(steps, common)] for steps, vals in (r.curves[tag] for r in have)]
    return (common, np.mean(values, axis=0)), seeds_note(len(group))


def error_ylim(curves: Sequence[Curve]) -> float:
    """Upper y-limit: 10% above the highest error after the first tenth of each run, rounded up to 5, in [5, 100]."""
    tails = [vals[steps >= 0.1 * steps[-1]] for steps, vals in curves if len(steps)]
    top = max((float(t.max()) for t in tails if len(t)), default=100.0)
    return float(min(100, max(5, 5 * math.ceil(1.1 * top / 5))))


def no_runs(ax: Axes) -> None:
    """Mark an empty panel instead of letting it vanish."""
    ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", fontsize=14, color="grey")


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write the figure as PNG and PDF and close it."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def iteration_axis(runs: Sequence[Run]) -> tuple[float, str]:
    """x scale and label: the paper's units of 1e4 iterations, or plain iterations for runs shorter than 10k."""
    longest = max((int(r.metrics.get("iterations") or 0) for r in runs), default=0)
    return (1e4, "iter. (1e4)") if longest >= 10_000 else (1.0, "iterations")


def plot_fig6(runs: Sequence[Run], out: Path, title: str) -> list[Path]:
    """Figure 6: training (thin dashed) and test (bold) error vs iterations; plain, ResNet, deep ResNet panels."""
    groups = figure_groups(runs)
    x_scale, x_label = iteration_axis(runs)
    colours = depth_colours([d for _, d in groups])
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.2), sharex=True, sharey=True, layout="constrained")
    plotted: list[Curve] = []
    for ax, (panel, shows) in zip(axes, FIG6_PANELS):
        handles = []
        for (arch, depth), group in ((k, g) for k, g in groups.items() if shows(k)):
            (train, _), (test, note) = mean_curve(group, "train/err"), mean_curve(group, "test/err")
            colour = colours[depth]
            for curve, style in ((train, {"ls": "--", "lw": 0.9}), (test, {"ls": "-", "lw": 2.2})):
                if curve is not None:
                    ax.plot(curve[0] / x_scale, curve[1], color=colour, **style)
                    plotted.append(curve)
            handles.append(Line2D([], [], color=colour, lw=2.2, label=model_name(arch, depth) + note))
        if not handles:
            no_runs(ax)
        handles += [
            Line2D([], [], color="k", ls="--", lw=0.9, label="training error"),
            Line2D([], [], color="k", lw=2.2, label="test error"),
        ]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)
        ax.set(title=panel, xlabel=x_label)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelleft=True)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, error_ylim(plotted))
    axes[0].set_xlim(left=0)
    fig.suptitle(textwrap.fill(f"Figure 6 (reproduction): {title}", 160))
    return save(fig, out, "fig6")


def plot_fig7(runs: Sequence[Run], out: Path, title: str) -> list[Path]:
    """Figure 7: std of each 3×3 layer's response, in layer order (top) and sorted descending (bottom)."""
    groups = {k: [r for r in g if r.metrics.get("layer_response_std")] for k, g in figure_groups(runs).items()}
    omitted = sorted(model_name(*k) for k, g in groups.items() if g and k[1] > FIG7_MAX_DEPTH)
    groups = {k: g for k, g in groups.items() if g and k[1] <= FIG7_MAX_DEPTH}
    colours = depth_colours([d for _, d in groups])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), layout="constrained")
    for (arch, depth), group in groups.items():
        stds = [r.metrics["layer_response_std"] for r in group]
        averaged = len({len(s) for s in stds}) == 1
        std = np.mean(stds, axis=0) if averaged else np.asarray(stds[0])
        style = {"color": colours[depth], "ls": "--" if arch == "plain" else "-", "lw": 1.5}
        label = model_name(arch, depth) + seeds_note(len(group), None if averaged else group[0].metrics["seed"])
        top.plot(np.arange(1, len(std) + 1), std, label=label, **style)
        bottom.plot(np.arange(1, len(std) + 1), np.sort(std)[::-1], **style)
    for ax, xlabel in ((top, "layer index (original)"), (bottom, "layer index (sorted by magnitude)")):
        ax.set(xlabel=xlabel, ylabel="std")
        ax.grid(True, alpha=0.3)
        if not groups:
            no_runs(ax)
    if groups:
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="plain dashed, ResNet solid")
    if omitted:
        note = f"{', '.join(omitted)} not shown: as in the paper, depths up to {FIG7_MAX_DEPTH} only"
        bottom.text(0.99, 0.97, note, transform=bottom.transAxes, ha="right", va="top", fontsize=9, color="grey")
    heading = "Figure 7 (reproduction): std of layer responses (after BN, before addition)"
    fig.suptitle(f"{heading}\n{textwrap.fill(title, 95)}")
    return save(fig, out, "fig7")


def format_err(mean: float, std: float | None) -> str:
    """'7.51±0.16' (two decimals, as the paper prints), or '7.51' for a single seed."""
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write rows as CSV; None becomes an empty cell."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if c is None else c for c in row] for row in rows])
    return path


def write_table6(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Table 6 as markdown and CSV: our final test error (mean±std over seeds, best) beside the paper's."""
    header = ["arch", "depth", "shortcut", "params", "n (seeds)", "test err mean±std (%)", "best (%)",
              f"paper (%), {SOURCE}"]  # fmt: skip
    md_rows = [
        [r["arch"], r["depth"], r["shortcut"], f"{r['params'] / 1e6:.2f}M",
         f"{r['n']} ({', '.join(map(str, r['seeds']))})", format_err(r["mean"], r["std"]), f"{r['best']:.2f}",
         r["paper"].describe() if r["paper"] else "—"]
        for r in rows
    ]  # fmt: skip
    notes = "".join(f"\n> warning: {w}\n" for w in mixed_groups(rows))
    md = (
        f"# Table 6 (reproduction): CIFAR-10 test error\n\n{title}. Final model's test error, no selection on the "
        "test set; mean±std over seeds (sample std), best = lowest seed.\n\n"
        + markdown_table(header, md_rows)
        + f"{notes}\nOur runs' numerics: {'; '.join(sorted({n for r in rows for n in r['numerics']}))} "
        f"(paper: {PAPER_NUMERICS}).\n"
        f"\nPaper column: {SOURCE} (option A, 64k iterations, 50k training images, 10k test images); "
        f"it gives no number for plain nets (only Figure 6 curves). {CITATION}\n"
    )
    (out / "table6.md").write_text(md)
    csv_header = ["arch", "depth", "shortcut", "params", "n", "seeds", "test_err_mean", "test_err_std", "test_err_best",
                  "paper_test_err", "paper_mean_std", "data", "iterations", "numerics"]  # fmt: skip
    csv_rows = [
        [r["arch"], r["depth"], r["shortcut"], r["params"], r["n"], ";".join(map(str, r["seeds"])), r["mean"], r["std"],
         r["best"], r["paper"] and r["paper"].test_err, r["paper"] and r["paper"].mean_std, ";".join(r["data"]),
         ";".join(map(str, r["iterations"])), ";".join(r["numerics"])]
        for r in rows
    ]  # fmt: skip
    return [out / "table6.md", write_csv(out / "table6.csv", csv_header, csv_rows)]


def write_shortcuts(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Shortcut options side by side (rows depth, columns A/B/C), one table per arch run with several options."""
    archs = [
        a
        for a in dict.fromkeys(r["arch"] for r in rows)
        if a != "plain" and len({r["shortcut"] for r in rows if r["arch"] == a}) > 1
    ]
    if not archs:
        for stale in ("shortcuts.md", "shortcuts.csv"):
            (out / stale).unlink(missing_ok=True)
        return []
    cells = {(r["arch"], r["depth"], r["shortcut"]): r for r in rows}
    sections, csv_rows = [], []
    for arch in archs:
        depths = sorted({r["depth"] for r in rows if r["arch"] == arch})
        md_rows = []
        for depth in depths:
            found = [cells.get((arch, depth, s)) for s in SHORTCUTS]
            md_rows.append([depth, *(format_err(c["mean"], c["std"]) + f" (n={c['n']})" if c else "—" for c in found)])
            csv_rows.append([arch, depth, *(c and c[k] for c in found for k in ("mean", "std", "n"))])
        sections.append(
            f"## {model_name(arch, None)}: test error (%) by shortcut option\n\n"
            + markdown_table(["depth", *SHORTCUTS], md_rows)
        )
    (out / "shortcuts.md").write_text(
        f"# Shortcut options A/B/C\n\n{title}. Mean±std over seeds.\n\n" + "\n".join(sections)
    )
    csv_header = ["arch", "depth", *(f"{s}_{v}" for s in SHORTCUTS for v in ("mean", "std", "n"))]
    return [out / "shortcuts.md", write_csv(out / "shortcuts.csv", csv_header, csv_rows)]


def write_verdict(runs: Sequence[Run], rows: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """verdict.md: degradation sentences, pooled-run warnings, failed runs and provenance, all from the runs."""
    failed = [
        f"- `{r.path}`: {r.metrics.get('error', 'unknown error')} (iteration {r.metrics.get('iteration')})"
        for r in failed_runs(runs)
    ]
    lines = [
        f"# Verdict: degradation and residual learning\n\n{title}.\n",
        "## Final errors compared\n",
        *(f"- {s}" for s in degradation_verdict(runs)),
        "\nFinal training error is the mean over the last logging interval's (augmented) minibatches; "
        "errors are means over seeds where several exist.\n",
        *(f"> warning: {w}\n" for w in mixed_groups(rows)),
        "## Failed runs (excluded from every table and figure)\n",
        *(failed or ["- none"]),
        "\n## Provenance (from metrics.json)\n",
        *(f"- {k}: {v}" for k, v in provenance(runs).items()),
        f"- paper: {CITATION}",
    ]
    path = out / "verdict.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_all(runs: Sequence[Run], out: Path, title_suffix: str = "") -> list[Path]:
    """Every figure and table for these runs into `out`; returns the paths written."""
    if not any(r.finished for r in runs):
        raise ConfigError(f"no finished run (metrics.json) among {len(runs)} run directories")
    out.mkdir(parents=True, exist_ok=True)
    title = data_description(runs) + title_suffix
    rows = runs_table(runs)
    for run in failed_runs(runs):
        log.warning("failed run %s: %s", run.path, run.metrics.get("error"))
    return [
        *plot_fig6(runs, out, title),
        *plot_fig7(runs, out, title),
        *write_table6(rows, out, title),
        *write_shortcuts(rows, out, title),
        write_verdict(runs, rows, out, title),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m resnet_repro.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories, or directories searched for them")
    parser.add_argument("--out", required=True, type=Path, help="output directory, e.g. results/fig6")
    parser.add_argument("--title-suffix", default="", help="text appended to the figure and table titles")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: collect runs, write figures and tables, print the paths written; exit 2 on a user error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs every event file it finishes reading
    try:
        run_dirs, dropped = unique_runs(find_runs(args.run_dirs))
        for copy, original in dropped:
            log.info("%s trains the same configuration as %s: counted once", copy, original)
        runs = [load_run(d) for d in run_dirs]
        paths = write_all(runs, args.out, args.title_suffix)
    except ConfigError as exc:
        print(f"error: {exc} (searched {', '.join(args.run_dirs)})", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
