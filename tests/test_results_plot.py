"""results.py and plot.py on fabricated run directories: tables equal the metrics, verdicts follow the data."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from run_dir_factory import make_failed_run_dir, make_run_dir

from resnet_repro import plot
from resnet_repro.results import (
    PAPER_NUMERICS,
    degradation_verdict,
    find_runs,
    load_run,
    mixed_groups,
    runs_table,
    training_numerics,
)

# (arch, depth) → final test errors by seed; train error is test error - 2 unless a test says otherwise.
TEST_ERRS = {("plain", 20): [9.13], ("plain", 56): [12.71], ("resnet", 20): [8.41, 8.87], ("resnet", 56): [7.02, 7.55]}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain 20/56, ResNet 20/56 with two seeds each, and one diverged ResNet-56 run."""
    root = tmp_path_factory.mktemp("runs")
    for (arch, depth), errs in TEST_ERRS.items():
        for seed, err in enumerate(errs):
            make_run_dir(root / arch, arch, depth, seed=seed, final_test_err=err)
    make_failed_run_dir(root / "resnet", "resnet", 56, seed=2)
    return root


@pytest.fixture(scope="module")
def outputs(runs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the CLI once over all fabricated runs."""
    out = tmp_path_factory.mktemp("results")
    assert plot.main([str(runs_root), "--out", str(out), "--title-suffix", " (test)"]) == 0
    return out


def table_rows(md: str) -> dict[tuple[str, str], list[str]]:
    """Markdown table rows keyed by (arch, depth)."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return {(c[0], c[1]): c for c in cells[1:]}


def test_find_runs_includes_failed_and_loads_status(runs_root: Path) -> None:
    runs = [load_run(d) for d in find_runs([runs_root])]
    assert len(runs) == 7
    assert [r.path.name for r in runs if not r.finished] == ["model.depth=56,model.shortcut=A,model=resnet,seed=2"]


def test_curves_read_back_equal_written(tmp_path: Path) -> None:
    steps, values = [10, 20, 30, 40], [80.5, 61.25, 40.125, 33.0]
    curves = {"train/err": (steps, values), "test/err": ([20, 40], [70.0, 50.5]), "opt/lr": (steps, [0.1] * 4)}
    run = load_run(make_run_dir(tmp_path, "resnet", 20, curves=curves))
    assert set(run.curves) == set(curves)
    for tag, (written_steps, written_values) in curves.items():
        np.testing.assert_array_equal(run.curves[tag][0], written_steps)
        np.testing.assert_allclose(run.curves[tag][1], written_values, rtol=1e-6)  # stored as float32


def test_runs_table_statistics(runs_root: Path) -> None:
    rows = {(r["arch"], r["depth"]): r for r in runs_table([load_run(d) for d in find_runs([runs_root])])}
    assert rows[("resnet", 56)]["n"] == 2  # the failed seed 2 is not averaged in
    assert rows[("resnet", 56)]["std"] == pytest.approx(statistics.stdev(TEST_ERRS[("resnet", 56)]))
    assert rows[("plain", 20)]["std"] is None
    assert rows[("resnet", 20)]["paper"].test_err == 8.75
    assert rows[("plain", 56)]["paper"] is None


def test_table6_matches_metrics(outputs: Path) -> None:
    rows = table_rows((outputs / "table6.md").read_text())
    for (arch, depth), errs in TEST_ERRS.items():
        row = rows[(arch, str(depth))]
        expected = f"{statistics.fmean(errs):.2f}" + (f"±{statistics.stdev(errs):.2f}" if len(errs) > 1 else "")
        assert row[5] == expected
        assert row[6] == f"{min(errs):.2f}"
        assert row[4].startswith(f"{len(errs)} (")
        assert (row[7] == "—") == (arch == "plain")
    assert rows[("resnet", "56")][7] == "6.97"
    assert "He et al. 2015" in (outputs / "table6.md").read_text().splitlines()[4]
    assert (outputs / "table6.csv").read_text().count("\n") == 1 + len(TEST_ERRS)
    assert not (outputs / "shortcuts.md").exists()  # only option A was run


def test_verdict_lists_failures_and_provenance(outputs: Path) -> None:
    verdict = (outputs / "verdict.md").read_text()
    assert "Degradation: plain-56 ends with higher final training error (10.71% vs 7.13%)" in verdict
    assert "seed=2`: loss is NaN (diverged) (iteration 120)" in verdict
    assert "CIFAR-10 sample (5,085 train / 1,017 test)" in verdict
    assert "runs: 6 finished, 1 failed" in verdict


@pytest.mark.parametrize(("deep_train", "degraded"), [(12.0, True), (5.0, False)])
def test_degradation_follows_the_data(tmp_path: Path, deep_train: float, degraded: bool) -> None:
    make_run_dir(tmp_path, "plain", 20, final_test_err=9.0, final_train_err=6.0)
    make_run_dir(tmp_path, "plain", 56, final_test_err=11.0, final_train_err=deep_train)
    make_run_dir(tmp_path, "resnet", 56, final_test_err=7.0, final_train_err=3.0)
    sentences = degradation_verdict([load_run(d) for d in find_runs([tmp_path])])
    assert sentences[0].startswith("Degradation: plain-56" if degraded else "No degradation: plain-56")
    assert f"({deep_train:.2f}% vs 6.00%)" in sentences[0]
    assert sentences[1].startswith("Residual learning helps at depth 56: ResNet-56 ends with lower")


DEEPER = [
    (8.0, "Deeper ResNet better"),
    (9.5, "Deeper ResNet partly better"),
    (12.0, "Deeper ResNet not better (unlike the paper)"),
]


@pytest.mark.parametrize(("deep_test", "headline"), DEEPER)
def test_deeper_resnets_are_compared_with_each_other(tmp_path: Path, deep_test: float, headline: str) -> None:
    make_run_dir(tmp_path, "resnet", 20, final_test_err=9.0, final_train_err=6.0)
    make_run_dir(tmp_path, "resnet", 56, final_test_err=deep_test, final_train_err=deep_test - 4.0)
    sentences = degradation_verdict([load_run(d) for d in find_runs([tmp_path])])
    assert sentences[-1].startswith(f"{headline}: ResNet-56 ends with ")
    assert f"final test error ({deep_test:.2f}% vs 9.00%) than ResNet-20." in sentences[-1]


def test_a_single_seed_gap_under_half_a_point_is_called_noise(tmp_path: Path) -> None:
    make_run_dir(tmp_path, "plain", 20, final_test_err=9.0, final_train_err=6.0)
    make_run_dir(tmp_path, "plain", 56, final_test_err=9.4, final_train_err=6.3)  # higher, by 0.4 and 0.3 points
    make_run_dir(tmp_path, "resnet", 56, final_test_err=8.8, final_train_err=5.0)  # 0.6 / 1.3 points below plain-56
    sentences = degradation_verdict([load_run(d) for d in find_runs([tmp_path])])
    assert sentences[0] == (
        "Within noise (one seed, gap under 0.5 points): plain-56 ends with higher (within noise) final training "
        "error (6.30% vs 6.00%) and higher (within noise) final test error (9.40% vs 9.00%) than plain-20."
    )
    assert sentences[1].startswith("Residual learning helps at depth 56: ResNet-56 ends with lower final training")


@pytest.mark.parametrize("name", ["fig6.png", "fig7.png"])
def test_figures_written(outputs: Path, name: str) -> None:
    path = outputs / name
    assert path.stat().st_size > 10_000
    assert matplotlib.image.imread(path).shape[0] > 500
    assert path.with_suffix(".pdf").stat().st_size > 0


def test_shortcut_table_when_several_options(tmp_path: Path) -> None:
    for shortcut, err in (("A", 8.5), ("B", 8.25), ("C", 8.0)):
        make_run_dir(tmp_path / "runs", "resnet", 20, shortcut=shortcut, final_test_err=err)
    rows = runs_table([load_run(d) for d in find_runs([tmp_path / "runs"])])
    plot.write_shortcuts(rows, tmp_path, "test")
    assert "| 20 | 8.50 (n=1) | 8.25 (n=1) | 8.00 (n=1) |" in (tmp_path / "shortcuts.md").read_text()


def test_cli_refuses_without_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no finished run" in capsys.readouterr().err
    make_failed_run_dir(tmp_path, "plain", 20)
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_metrics_json_follows_contract(runs_root: Path) -> None:
    metrics = json.loads(next(runs_root.rglob("metrics.json")).read_text())
    assert metrics["status"] == "finished"
    assert {"arch", "depth", "shortcut", "seed", "data", "final_test_err", "layer_response_std", "versions"} <= set(
        metrics
    )
    assert list(next(runs_root.rglob("metrics.json")).parent.glob("events.out.tfevents.*"))


def test_mean_curve_averages_seeds_on_common_steps(tmp_path: Path) -> None:
    curves = [{"test/err": ([100, 200], [40.0, 30.0])}, {"test/err": ([100, 200, 300], [50.0, 20.0, 10.0])}]
    group = [load_run(make_run_dir(tmp_path, "plain", 20, seed=s, curves=c)) for s, c in enumerate(curves)]
    (steps, values), note = plot.mean_curve(group, "test/err")
    np.testing.assert_array_equal(steps, [100, 200])
    np.testing.assert_allclose(values, [45.0, 25.0])
    assert note == " (mean of 2 seeds)"
    assert plot.mean_curve(group[:1], "train/err") == (None, "")


def test_cli_counts_a_configuration_trained_by_two_experiments_once(tmp_path: Path) -> None:
    """ResNet-20 seed 0 of fig6_resnet and of table6 is one run, not two seeds (the previous `make plot` bug)."""
    for experiment in ("fig6_resnet", "table6"):
        make_run_dir(tmp_path / "runs" / experiment, "resnet", 20, seed=0, final_test_err=8.5,
                     experiment=experiment, config={"experiment": experiment})
    make_run_dir(tmp_path / "runs" / "table6", "resnet", 20, seed=1, final_test_err=9.5, experiment="table6",
                 config={"experiment": "table6"})
    assert plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    row = table_rows((tmp_path / "out" / "table6.md").read_text())[("resnet", "20")]
    assert row[4] == "2 (0, 1)" and row[5] == "9.00±0.71", row


def test_numerics_are_labelled_beside_the_papers_and_unlike_numerics_are_not_pooled_silently(tmp_path: Path) -> None:
    """Precision and BN batch are where a GPU run departs from the paper (fp32, BN over 64 images per GPU): every
    table and verdict says what ours were, and a row pooling bf16 with fp32 seeds is flagged."""

    def metrics(precision: str, group: int = 0, world: int = 1) -> dict:
        return {"precision": precision, "world_size": world,
                "config": {"data": {"batch_size": 128}, "model": {"bn_group": group}}}  # fmt: skip

    assert training_numerics(metrics("bf16")) == "bf16 autocast, BN over 128 images"
    assert training_numerics(metrics("fp32", group=64)) == "fp32, BN over 64 images"
    assert training_numerics(metrics("fp32", world=2)) == "fp32, BN over 64 images"  # torchrun, 2 GPUs
    make_run_dir(tmp_path, "resnet", 20, seed=0, final_test_err=8.0)
    make_run_dir(tmp_path, "resnet", 20, seed=1, final_test_err=8.2, precision="fp32")
    rows = runs_table([load_run(d) for d in find_runs([tmp_path])])
    assert rows[0]["numerics"] == ["bf16 autocast, BN over 128 images", "fp32, BN over 128 images"]
    assert "numerics" in " ".join(mixed_groups(rows))
    out = tmp_path / "out"
    assert plot.main([str(tmp_path), "--out", str(out)]) == 0
    table = (out / "table6.md").read_text()
    assert "Our runs' numerics: bf16 autocast, BN over 128 images; fp32, BN over 128 images" in table
    assert f"(paper: {PAPER_NUMERICS})" in table and "warning:" in table
    assert f"- numerics: bf16 autocast, BN over 128 images, fp32, BN over 128 images (paper: {PAPER_NUMERICS})" in (
        out / "verdict.md"
    ).read_text()
