"""`make bench` end to end on CPU with tiny windows: files, columns, interleaving; plus its small helpers.

No timing is asserted anywhere: the benchmark is the measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_repro.bench.concurrency import HOW_TO_SET_K, recommend_k
from resnet_repro.bench.helpers import random_cifar
from resnet_repro.bench.measure import Row
from resnet_repro.bench.report import suite_projection
from resnet_repro.bench.variants import parse_arch, plan_variants
from resnet_repro.data import DeviceData

REPO = Path(__file__).resolve().parents[1]
TABLE_COLUMNS = (
    "arch",
    "config",
    "ms/iter",
    "img/s",
    "64k projected",
    "one-time",
    "speedup vs baseline",
    "best-window speedup",
    "peak mem",
)
ROW_KEYS = (
    "arch",
    "config",
    "status",
    "ms_per_iter",
    "best_ms",
    "windows_ms",
    "img_per_s",
    "projected_64k_s",
    "one_time_s",
    "speedup",
    "peak_mem_mb",
)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[dict, str, list[str]]:
    """Run scripts/bench.py once on CPU (ResNet-8, batch 16, 2 rounds of 2 iterations, K = 1, 2)."""
    out = tmp_path_factory.mktemp("bench")
    args = [
        "--device",
        "cpu",
        "--arches",
        "resnet-8",
        "--batch-size",
        "16",
        "--iters",
        "2",
        "--windows",
        "2",
        "--warmup",
        "1",
        "--num-images",
        "64",
        "--workers",
        "1",
        "--ks",
        "1,2",
        "--k-iters",
        "2",
        "--k-num-images",
        "32",
        "--ckpt-repeats",
        "2",
        "--ckpt-dir",
        str(out / "ckpt"),
        "--out",
        str(out),
        "--tag",
        "test",
        "--threads",
        "1",  # two OpenMP threads on two shared cores can run many times slower than one
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench-test.json").read_text())
    return report, (out / "bench-test.md").read_text(), args


def test_cli_writes_markdown_and_json_with_every_column(bench_run) -> None:
    report, md, args = bench_run
    for column in TABLE_COLUMNS:
        assert column in md
    meta = report["meta"]
    for key in ("device", "device_name", "torch", "cuda", "cudnn", "git_sha", "date", "command"):
        assert key in meta
    assert meta["command"].startswith("python scripts/bench.py") and "--arches resnet-8" in meta["command"]
    assert meta["complete"] is True and meta["stage"] == "complete" and "Partial report" not in md
    rows = {r["config"]: r for r in report["rows"]}
    keys = ("1", "2", "3", "1cl", "3cl", "4cl", "1c", "1clc", "4", "5", "5b", "3g", "5bg")  # on CPU: the channels_last rows too
    assert list(rows) == ["baseline", *(f"ours-{k}" for k in keys)]
    assert rows["ours-3g"]["status"] == "skipped" and "needs a batch above 64" in rows["ours-3g"]["note"]  # batch 16
    for key in ("baseline", "ours-1", "ours-3"):
        assert rows[key]["status"] == "ok", rows[key]["note"]
        for field in ROW_KEYS:
            assert field in rows[key]
        assert len(rows[key]["windows_ms"]) == 2 and rows[key]["ms_per_iter"] > 0
        assert rows[key]["projected_64k_s"] == pytest.approx(rows[key]["ms_per_iter"] * 64)
        assert rows[key]["img_per_s"] == pytest.approx(16_000 / rows[key]["ms_per_iter"])
    assert rows["baseline"]["speedup"] == pytest.approx(1.0)
    assert rows["ours-2"]["status"] in ("ok", "skipped")  # bf16 on CPU runs unless absurdly slow
    assert rows["ours-4"]["status"] == "skipped" and "compile-on-cpu" in rows["ours-4"]["note"]
    for key in ("ours-5", "ours-5b", "ours-5bg"):
        assert rows[key]["status"] == "skipped" and "CUDA" in rows[key]["note"]
    assert "ResNet-8" in md and "skipped" in md


def test_baseline_and_ours_are_interleaved(bench_run) -> None:
    """Each round times every running config once, baseline first; rounds follow each other."""
    report, _, _ = bench_run
    order = report["order"]
    assert [o["seq"] for o in order] == list(range(len(order)))
    running = [r["config"] for r in report["rows"] if r["status"] == "ok"]
    assert len(running) >= 3
    assert [o["config"] for o in order] == running * 2
    assert [o["round"] for o in order] == [0] * len(running) + [1] * len(running)
    for row in report["rows"]:
        if row["status"] == "ok":
            assert row["windows_ms"] == [o["ms_per_iter"] for o in order if o["config"] == row["config"]]


def test_checkpoint_overhead_and_several_processes_reported(bench_run) -> None:
    report, md, _ = bench_run
    (ck,) = report["checkpoint"]
    assert ck["file_bytes"] > 0 and ck["interval_iters"] == 2000 and 0 < ck["overhead_pct"] < 100
    assert len(ck["write_ms_all"]) == 2
    assert "Checkpoint overhead" in md
    conc = report["concurrency"]
    assert [r["k"] for r in conc["results"]] == [1, 2]
    for r in conc["results"]:
        assert r["status"] == "ok", r.get("note")
        assert r["total_images"] == r["k"] * 2 * 16 and r["img_per_s"] > 0
        assert len(r["per_process_img_per_s"]) == r["k"]
    assert conc["recommendation"]["k"] is None and "GPU" in conc["recommendation"]["why"]
    assert "n_jobs" in md and "Several models per device" in md
    assert not any(Path(report["settings"]["ckpt_dir"]).rglob("*.pt"))  # the timed checkpoints are removed


def test_a_benchmark_stopped_mid_way_keeps_what_it_finished(tmp_path: Path, monkeypatch) -> None:
    """The report is rewritten after every round, arch and K, so a benchmark stopped by a time limit (each step
    of scripts/gpu_session.sh has one) leaves what it finished on disk, marked partial."""
    from resnet_repro.bench import cli

    written = []  # (stage, windows per row, K values) of every report written, in order
    real_write = cli.write_report

    def recording_write(report, out_dir, tag, echo=True):
        windows = [len(r["windows_ms"]) for r in report["rows"]]
        written.append((report["meta"]["stage"], windows, [r["k"] for r in report["concurrency"]["results"]]))
        return real_write(report, out_dir, tag, echo)

    def stopped_after_k1(arch, depth, ks, args, device, config, log_dir, on_result):
        assert ks == [1, 2]
        real_measure(arch, depth, [1], args, device, config, log_dir, on_result)  # the real K=1 measurement
        raise KeyboardInterrupt  # what the time limit's signal does before K=2

    real_measure = cli.measure_concurrency
    monkeypatch.setattr(cli, "measure_concurrency", stopped_after_k1)
    monkeypatch.setattr(cli, "write_report", recording_write)
    args = ["--device", "cpu", "--arches", "resnet-8", "--configs", "baseline,ours-1", "--batch-size", "16",
            "--iters", "1", "--windows", "2", "--warmup", "1", "--num-images", "32", "--workers", "0",
            "--ks", "1,2", "--k-arches", "resnet-8", "--k-iters", "2", "--k-num-images", "16", "--no-checkpoint",
            "--threads", "1",
            "--out", str(tmp_path), "--tag", "stopped"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    assert written == [
        ("1 of 2 rounds of ResNet-8", [1, 1], []),
        ("the ResNet-8 rows", [2, 2], []),
        ("K=1 of ResNet-8", [2, 2], [1]),
    ]
    last = json.loads((tmp_path / "bench-stopped.json").read_text())
    assert last["meta"]["complete"] is False and last["meta"]["stage"] == "K=1 of ResNet-8"
    assert [r["config"] for r in last["rows"]] == ["baseline", "ours-1"]
    assert [r["status"] for r in last["rows"]] == ["ok", "ok"] and last["rows"][0]["speedup"] == pytest.approx(1.0)
    assert [(r["k"], r["status"]) for r in last["concurrency"]["results"]] == [(1, "ok")]
    md = (tmp_path / "bench-stopped.md").read_text()
    assert "Partial report" in md and "last written: K=1 of ResNet-8" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_plan_on_cpu_skips_cuda_only_rows() -> None:
    plan = {p.variant.key: p for p in plan_variants(torch.device("cpu"), compile_on_cpu=False)}
    assert plan["baseline"].variant.pipeline == "baseline" and plan["baseline"].variant.sgd == "default"
    assert plan["ours-1"].variant.sgd == "foreach" and plan["ours-1"].variant.precision == "fp32"
    assert plan["ours-2"].variant.precision == "bf16" and not plan["ours-2"].variant.channels_last
    assert plan["ours-3"].variant.sgd == "fused"
    assert plan["ours-4"].skip and plan["ours-5"].skip
    forced = {p.variant.key: p for p in plan_variants(torch.device("cpu"), compile_on_cpu=True)}
    assert forced["ours-4"].skip is None and forced["ours-4"].variant.compile
    cuda = {p.variant.key: p for p in plan_variants(torch.device("cuda"), compile_on_cpu=False)}
    assert all(p.skip is None for p in cuda.values())
    assert cuda["ours-2"].variant.channels_last and cuda["ours-5"].variant.graphs and cuda["ours-5"].variant.compile
    assert cuda["ours-5b"].variant.graphs and not cuda["ours-5b"].variant.compile


def test_the_papers_bn_statistics_row_runs_ghost_bn_over_64_images() -> None:
    """(3g) is (3) with model.bn_group=64, the paper's two-GPU BN statistics: what train.py builds for that key."""
    from resnet_repro.bench.ours import OursRunner
    from resnet_repro.models.ghost_bn import GhostBatchNorm2d

    plan = {p.variant.key: p for p in plan_variants(torch.device("cpu"), compile_on_cpu=False)}
    assert plan["ours-3g"].skip is None and plan["ours-5bg"].skip == "CUDA only"
    data = DeviceData(random_cifar(256, 8, seed=0), None, torch.device("cpu"), "pixel_mean", True, seed=0)
    runner = OursRunner("resnet", 8, plan["ours-3g"].variant, data, 128)
    bns = [m for m in runner.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, GhostBatchNorm2d) and m.group_size == 64 for m in bns)
    runner.run(1)
    plain = OursRunner("resnet", 8, plan["ours-3"].variant, data, 128)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.model.modules())


def test_arch_parsing() -> None:
    assert parse_arch("resnet-110") == ("resnet", 110)
    assert parse_arch("plain110") == ("plain", 110)
    with pytest.raises(SystemExit):
        parse_arch("resnet_x")


def test_a_cuda_device_is_picked_with_its_index(monkeypatch) -> None:
    """`torch.cuda.set_device` refuses a device without an index: `auto` and `cuda` resolve to the current one
    (torch.cuda mocked: no GPU here)."""
    from resnet_repro.bench.cli import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    for name in ("auto", "cuda"):
        assert pick_device(name) == torch.device("cuda", 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match="not available"):
        pick_device("cuda")


def test_reports_name_the_commit_outside_git_when_told(tmp_path: Path, monkeypatch) -> None:
    """A tree copied without .git (the GPU machine's) records `$RESNET_REPRO_GIT_SHA`, else None."""
    from resnet_repro.tracking import GIT_SHA_ENV, git_sha

    monkeypatch.delenv(GIT_SHA_ENV, raising=False)
    assert git_sha(tmp_path) is None
    monkeypatch.setenv(GIT_SHA_ENV, "0123abc-dirty")
    assert git_sha(tmp_path) == "0123abc-dirty"
    assert git_sha() not in (None, "0123abc-dirty")  # inside this checkout, git itself answers


def test_k_recommendation_only_from_a_gpu() -> None:
    results = [
        {"arch": "ResNet-20", "k": k, "status": "ok", "img_per_s": v}
        for k, v in [(1, 100), (2, 170), (4, 195), (8, 200)]
    ]
    assert recommend_k(results, torch.device("cpu"))["k"] is None
    assert recommend_k(results, torch.device("cuda"))["k"] == 4  # 195 >= 0.9 * 200 > 170
    assert "n_jobs" in HOW_TO_SET_K


def test_suite_projection_interpolates_in_depth() -> None:
    rows = []
    for depth, ms in [(20, 1.0), (110, 4.0)]:
        row = Row(f"ResNet-{depth}", "ours-3", "", "")
        row.status, row.ms_per_iter = "ok", ms
        rows.append(row)
    suite = suite_projection(rows, [], {"k": None})
    per_layer = 3.0 / 90
    expected_ms = sum(1.0 + per_layer * (d - 20) for d in (20, 32, 44, 56, 20, 32, 44, 56, 110))
    assert suite["sequential_s"] == pytest.approx(expected_ms * 64)


def _fake_gpu_report(report: dict, arch: str, ms: float, k_results: list[dict]) -> dict:
    """The CPU report re-labelled as one GPU's measurement of `arch` at `ms` ms/iter (for the merge logic)."""
    fake = json.loads(json.dumps(report))
    fake["meta"].update(device="cuda", device_name="Fake GPU")
    for row in fake["rows"]:
        row["arch"] = arch
        if row["status"] == "ok" and row["config"] != "baseline":
            row["ms_per_iter"] = ms
    fake["concurrency"]["results"] = k_results
    return fake


def test_combine_merges_per_arch_reports_and_recomputes_k_and_the_suite(bench_run, tmp_path: Path) -> None:
    report, _, _ = bench_run
    k_results = json.loads(json.dumps(report["concurrency"]["results"]))  # K = 1, 2 as measured, then relabelled
    assert [r["k"] for r in k_results] == [1, 2]
    for result, img_per_s in zip(k_results, (100.0, 195.0), strict=True):
        result.update(arch="ResNet-20", status="ok", img_per_s=img_per_s, vs_k1=img_per_s / 100.0)
    paths = []
    for name, arch, ms, k in [("a", "ResNet-20", 1.0, []), ("b", "ResNet-110", 4.0, k_results)]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_fake_gpu_report(report, arch, ms, k)))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--combine", *map(str, paths), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "bench-combined.json").read_text())
    assert {r["arch"] for r in merged["rows"]} == {"ResNet-20", "ResNet-110"}
    assert len(merged["rows"]) == 2 * len(report["rows"]) and merged["meta"]["sources"] == list(map(str, paths))
    assert merged["concurrency"]["recommendation"]["k"] == 2
    per_layer = 3.0 / 90
    expected_ms = sum(1.0 + per_layer * (d - 20) for d in (20, 32, 44, 56, 20, 32, 44, 56, 110))
    assert merged["figure6_suite"]["sequential_s"] == pytest.approx(expected_ms * 64)
    assert merged["figure6_suite"]["concurrent_s"] == pytest.approx(expected_ms * 64 / 1.95)
    assert "Figure-6 suite projection" in (tmp_path / "bench-combined.md").read_text()


def test_combined_rows_are_compared_with_the_baseline_timed_beside_them(bench_run) -> None:
    """Two calls on one arch (gpu_session.sh's eager and compiled rows), each with its own baseline: each row's
    best-window speedup is against its own call's baseline, not the first one of its arch."""
    from resnet_repro.bench.report import render_markdown

    report, _, _ = bench_run
    template = next(r for r in report["rows"] if r["status"] == "ok" and r["config"] != "baseline")
    base = next(r for r in report["rows"] if r["config"] == "baseline")
    rows = []
    for config, best_ms in [("baseline", 10.0), ("ours-3", 5.0), ("baseline", 20.0), ("ours-4", 4.0)]:
        row = dict(base if config == "baseline" else template, config=config, best_ms=best_ms, label=config)
        rows.append(row)
    combined = dict(json.loads(json.dumps(report)), rows=rows, figure6_suite=None)
    table = render_markdown(combined).split("## Throughput")[1].split("\n\n")[1]  # the throughput table only
    best_window = [line.split(" | ")[9] for line in table.splitlines()[2:]]
    assert best_window == ["1.00x", "2.00x", "1.00x", "5.00x"]


def test_combine_refuses_reports_of_different_devices(bench_run, tmp_path: Path) -> None:
    report, _, _ = bench_run
    (tmp_path / "cpu.json").write_text(json.dumps(report))
    (tmp_path / "gpu.json").write_text(json.dumps(_fake_gpu_report(report, "ResNet-20", 1.0, [])))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--combine", str(tmp_path / "cpu.json"),
         str(tmp_path / "gpu.json"), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "different devices" in proc.stderr and "Fake GPU" in proc.stderr
