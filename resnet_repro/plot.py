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
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from resnet_repro.errors import ConfigError
from resnet_repro.paper import CITATION, SOURCE
from resnet_repro.results import (
    PAPER_NUMERICS,
    Curve,
    Run,
    by_depth,
    data_description,
    degradation_verdict,
    find_runs,
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
# Figure 6's panels: title, arch and depths shown (from, to).
FIG6_PANELS = (
    ("plain", "plain", 0, math.inf),
    ("ResNet (option A)", "resnet", 0, 110),
    ("deep ResNet (option A): 110 and 1202", "resnet", 110, math.inf),
)
FIG6_LINES = {
    "train/err": ("training error", {"ls": "--", "lw": 0.9}),
    "test/err": ("test error", {"ls": "-", "lw": 2.2}),
}


def figure_groups(runs: Sequence[Run]) -> dict[tuple[str, int], list[Run]]:
    """Finished plain nets (any shortcut: they have none) and option-A ResNets by (arch, depth), in table order."""
    groups = {("plain", depth): group for depth, group in by_depth(runs, "plain").items()}
    return groups | {("resnet", depth): group for depth, group in by_depth(runs, "resnet", "A").items()}


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


def new_figure(depths: Sequence[int], size: tuple[float, float], *shape: int, **share: bool) -> tuple:
    """A figure, its panels, and one colour per depth, the same in every panel and figure (the paper's depths keep
    fixed colours)."""
    fig = Figure(figsize=size, layout="constrained")
    palette = colormaps["tab10"].colors
    order = [*PAPER_DEPTHS, *sorted(set(depths) - set(PAPER_DEPTHS))]
    return fig, fig.subplots(*shape, **share), {d: palette[i % len(palette)] for i, d in enumerate(order)}


def finish_panel(ax: Axes, empty: bool, **labels: str) -> None:
    """Labels and a light grid; an empty panel says so instead of vanishing."""
    ax.set(**labels)
    ax.grid(True, alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", fontsize=14, color="grey")


def save(fig: Figure, out: Path, stem: str, title: str) -> list[Path]:
    """Title the figure and write it as PNG and PDF."""
    fig.suptitle(title)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def plot_fig6(runs: Sequence[Run], out: Path, title: str) -> list[Path]:
    """Figure 6: training (thin dashed) and test (bold) error vs iterations; plain, ResNet, deep ResNet panels."""
    groups = figure_groups(runs)
    longest = max((int(r.metrics.get("iterations") or 0) for r in runs), default=0)
    x_scale, x_label = (1e4, "iter. (1e4)") if longest >= 10_000 else (1.0, "iterations")  # the paper's 1e4 units
    fig, axes, colours = new_figure([d for _, d in groups], (16, 6.2), 1, 3, sharex=True, sharey=True)
    plotted: list[Curve] = []
    for ax, (panel, arch, low, high) in zip(axes, FIG6_PANELS):
        handles = []
        for depth, group in ((d, g) for (a, d), g in groups.items() if a == arch and low <= d <= high):
            for tag, (_, style) in FIG6_LINES.items():
                curve, note = mean_curve(group, tag)  # the legend quotes the test curve's note
                if curve is not None:
                    ax.plot(curve[0] / x_scale, curve[1], color=colours[depth], **style)
                    plotted.append(curve)
            handles.append(Line2D([], [], color=colours[depth], lw=2.2, label=model_name(arch, depth) + note))
        finish_panel(ax, not handles, title=panel, xlabel=x_label)
        handles += [Line2D([], [], color="k", label=label, **style) for label, style in FIG6_LINES.values()]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)
        ax.tick_params(labelleft=True)
    axes[0].set(ylabel="error (%)", ylim=(0, error_ylim(plotted)), xlim=(0, None))
    return save(fig, out, "fig6", textwrap.fill(f"Figure 6 (reproduction): {title}", 160))


def plot_fig7(runs: Sequence[Run], out: Path, title: str) -> list[Path]:
    """Figure 7: std of each 3×3 layer's response, in layer order (top) and sorted descending (bottom)."""
    groups = {k: [r for r in g if r.metrics.get("layer_response_std")] for k, g in figure_groups(runs).items()}
    omitted = sorted(model_name(*k) for k, g in groups.items() if g and k[1] > FIG7_MAX_DEPTH)
    groups = {k: g for k, g in groups.items() if g and k[1] <= FIG7_MAX_DEPTH}
    fig, (top, bottom), colours = new_figure([d for _, d in groups], (11, 8), 2, 1)
    for (arch, depth), group in groups.items():
        stds = [r.metrics["layer_response_std"] for r in group]
        averaged = len({len(s) for s in stds}) == 1
        std = np.mean(stds, axis=0) if averaged else np.asarray(stds[0])
        style = {"color": colours[depth], "ls": "--" if arch == "plain" else "-", "lw": 1.5}
        label = model_name(arch, depth) + seeds_note(len(group), None if averaged else group[0].metrics["seed"])
        top.plot(np.arange(1, len(std) + 1), std, label=label, **style)
        bottom.plot(np.arange(1, len(std) + 1), np.sort(std)[::-1], **style)
    for ax, order in ((top, "original"), (bottom, "sorted by magnitude")):
        finish_panel(ax, not groups, xlabel=f"layer index ({order})", ylabel="std")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if groups:
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="plain dashed, ResNet solid")
    if omitted:
        note = f"{', '.join(omitted)} not shown: as in the paper, depths up to {FIG7_MAX_DEPTH} only"
        bottom.text(0.99, 0.97, note, transform=bottom.transAxes, ha="right", va="top", fontsize=9, color="grey")
    heading = "Figure 7 (reproduction): std of layer responses (after BN, before addition)"
    return save(fig, out, "fig7", f"{heading}\n{textwrap.fill(title, 95)}")


def format_err(row: dict[str, Any]) -> str:
    """'7.51±0.16' (two decimals, as the paper prints), or '7.51' for a single seed."""
    return f"{row['mean']:.2f}" if row["std"] is None else f"{row['mean']:.2f}±{row['std']:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines) + "\n"


def write_tables(out: Path, stem: str, md: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Path]:
    """stem.md as given and stem.csv from header and rows (None as an empty cell)."""
    (out / f"{stem}.md").write_text(md)
    with (out / f"{stem}.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *(["" if c is None else c for c in row] for row in rows)])
    return [out / f"{stem}.md", out / f"{stem}.csv"]


def write_table6(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Table 6 as markdown and CSV: our final test error (mean±std over seeds, best) beside the paper's."""
    header = ["arch", "depth", "shortcut", "params", "n (seeds)", "test err mean±std (%)", "best (%)",
              f"paper (%), {SOURCE}"]  # fmt: skip
    md_rows = [
        [r["arch"], r["depth"], r["shortcut"], f"{r['params'] / 1e6:.2f}M",
         f"{r['n']} ({', '.join(map(str, r['seeds']))})", format_err(r), f"{r['best']:.2f}",
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
    csv_header = ["arch", "depth", "shortcut", "params", "n", "seeds", "test_err_mean", "test_err_std", "test_err_best",
                  "paper_test_err", "paper_mean_std", "data", "iterations", "numerics"]  # fmt: skip
    csv_rows = [
        [r["arch"], r["depth"], r["shortcut"], r["params"], r["n"], ";".join(map(str, r["seeds"])), r["mean"], r["std"],
         r["best"], r["paper"] and r["paper"].test_err, r["paper"] and r["paper"].mean_std, ";".join(r["data"]),
         ";".join(map(str, r["iterations"])), ";".join(r["numerics"])]
        for r in rows
    ]  # fmt: skip
    return write_tables(out, "table6", md, csv_header, csv_rows)


def write_shortcuts(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Shortcut options side by side (rows depth, columns A/B/C), one table per arch run with several options."""
    cells = {(r["arch"], r["depth"], r["shortcut"]): r for r in rows}
    archs = [
        a for a in dict.fromkeys(a for a, _, _ in cells) if a != "plain" and len({s for b, _, s in cells if b == a}) > 1
    ]
    if not archs:
        for stale in ("shortcuts.md", "shortcuts.csv"):
            (out / stale).unlink(missing_ok=True)
        return []
    sections, csv_rows = [], []
    for arch in archs:
        md_rows = []
        for depth in sorted({d for a, d, _ in cells if a == arch}):
            found = [cells.get((arch, depth, s)) for s in SHORTCUTS]
            md_rows.append([depth, *(f"{format_err(c)} (n={c['n']})" if c else "—" for c in found)])
            csv_rows.append([arch, depth, *(c and c[k] for c in found for k in ("mean", "std", "n"))])
        sections.append(f"## {model_name(arch, None)}: test error (%) by shortcut option\n\n")
        sections[-1] += markdown_table(["depth", *SHORTCUTS], md_rows)
    md = f"# Shortcut options A/B/C\n\n{title}. Mean±std over seeds.\n\n" + "\n".join(sections)
    csv_header = ["arch", "depth", *(f"{s}_{v}" for s in SHORTCUTS for v in ("mean", "std", "n"))]
    return write_tables(out, "shortcuts", md, csv_header, csv_rows)


def write_verdict(runs: Sequence[Run], rows: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """verdict.md: degradation sentences, pooled-run warnings, failed runs and provenance, all from the runs."""
    failed = [
        f"- `{r.path}`: {r.metrics.get('error', 'unknown error')} (iteration {r.metrics.get('iteration')})"
        for r in runs
        if not r.finished
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
    (out / "verdict.md").write_text("\n".join(lines) + "\n")
    return out / "verdict.md"


def write_all(runs: Sequence[Run], out: Path, title_suffix: str = "") -> list[Path]:
    """Every figure and table for these runs into `out`; returns the paths written."""
    if not any(r.finished for r in runs):
        raise ConfigError(f"no finished run (metrics.json) among {len(runs)} run directories")
    out.mkdir(parents=True, exist_ok=True)
    title = data_description(runs) + title_suffix
    rows = runs_table(runs)
    for run in runs:
        if not run.finished:
            log.warning("failed run %s: %s", run.path, run.metrics.get("error"))
    return [
        *plot_fig6(runs, out, title),
        *plot_fig7(runs, out, title),
        *write_table6(rows, out, title),
        *write_shortcuts(rows, out, title),
        write_verdict(runs, rows, out, title),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: collect runs, write figures and tables, print the paths written; exit 2 on a user error."""
    parser = argparse.ArgumentParser(prog="python -m resnet_repro.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories, or directories searched for them")
    parser.add_argument("--out", required=True, type=Path, help="output directory, e.g. results/fig6")
    parser.add_argument("--title-suffix", default="", help="text appended to the figure and table titles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs every event file it finishes reading
    try:
        run_dirs, dropped = unique_runs(find_runs(args.run_dirs))
        for copy, original in dropped:
            log.info("%s trains the same configuration as %s: counted once", copy, original)
        paths = write_all([load_run(d) for d in run_dirs], args.out, args.title_suffix)
    except ConfigError as exc:
        print(f"error: {exc} (searched {', '.join(args.run_dirs)})", file=sys.stderr)
        return 2
    print(*paths, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
