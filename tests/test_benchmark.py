"""`make bench` on CPU with tiny sizes: the report, its rows and K table, interleaving, the skips, a stop.

No timing is asserted anywhere: the benchmark is the measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from resnet_repro.bench import cli, measure, rows
from resnet_repro.bench.rows import BY_KEY, select, skip_reason

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[dict, str, str]:
    """scripts/bench.py once on CPU, every row: ResNet-8, batch 16, 2 rounds of 2 iterations, K = 1, 2."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--device", "cpu", "--arches", "resnet-8", "--batch-size", "16", "--iters", "2", "--windows", "2",
            "--warmup", "1", "--num-images", "64", "--workers", "1", "--ks", "1,2", "--k-arches", "resnet-8",
            "--k-iters", "2", "--k-num-images", "32", "--threads", "1", "--out", str(out), "--tag", "test"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args], cwd=REPO, capture_output=True, text=True,
        timeout=1200,  # minutes on a loaded machine: each K process starts its own interpreter
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench-test.json").read_text()), (out / "bench-test.md").read_text(), proc.stdout


def test_the_report_has_every_row_in_table_order_with_its_numbers(bench_run) -> None:
    report, md, stdout = bench_run
    meta = report["meta"]
    for key in ("device", "torch", "cuda", "cudnn", "git_sha", "date", "command", "cpu_count"):
        assert key in meta
    assert meta["command"].startswith("python scripts/bench.py --device cpu --arches resnet-8")
    assert meta["complete"] is True and "Partial report" not in md and md in stdout
    for column in ("ms/iter", "windows (ms/iter)", "img/s", "64k projected", "one-time", "speedup"):
        assert column in md
    rows = {r["row"]["key"]: r for r in report["rows"]}
    assert list(rows) == list(BY_KEY) and {r["arch"] for r in rows.values()} == {"resnet-8"}
    for key in ("baseline", "ours-1", "ours-1cl"):  # fp32: run on every CPU
        r = rows[key]
        assert r["status"] == "ok", r["note"]
        assert len(r["windows_ms"]) == 2 and r["ms_per_iter"] == pytest.approx(statistics.median(r["windows_ms"]))
        assert r["img_per_s"] == pytest.approx(16_000 / r["ms_per_iter"])
        assert r["projected_64k_s"] == pytest.approx(r["ms_per_iter"] * 64)
        assert r["one_time_s"] >= 0
        assert r["speedup"] == pytest.approx(rows["baseline"]["ms_per_iter"] / r["ms_per_iter"])
    for key in ("ours-2", "ours-3"):  # bf16: runs, unless this CPU emulates it
        assert rows[key]["status"] == "ok" or rows[key]["note"].startswith("bf16 is emulated on this CPU")
    assert all(rows[k]["note"] == "CUDA only" for k in ("ours-4", "ours-5", "ours-5b", "ours-5bg"))
    assert rows["ours-3g"]["note"] == "needs a batch above 64 (--batch-size 16)"
    assert "skipped: CUDA only" in md


def test_the_k_table_times_k_processes_at_once(bench_run) -> None:
    report, md, _ = bench_run
    assert [(e["k"], e["row"], e["status"]) for e in report["k"]] == [(1, "ours-1", "ok"), (2, "ours-1", "ok")]
    assert all(e["img_per_s"] > 0 and e["wall_s"] > 0 and e["threads_per_process"] == 1 for e in report["k"])
    assert "## K processes at once" in md and "RESNET_REPRO_RUNS_PER_GPU" in md


class FakeRunner:
    """A runner that records its calls and takes `ms` per iteration by decree (no clock)."""

    def __init__(self, key: str, ms: float, calls: list) -> None:
        self.key, self.ms, self.calls = key, ms, calls

    def run(self, iters: int) -> None:
        """Record the call."""
        self.calls.append((self.key, iters))


@pytest.fixture
def fake_runners(monkeypatch) -> tuple[list, dict[str, float]]:
    """measure.make_runner gives FakeRunners (ms/iter from the returned dict, default 10) and time_window their ms."""
    calls: list = []
    ms: dict[str, float] = {}
    monkeypatch.setattr(measure, "make_runner", lambda row, *_: FakeRunner(row.key, ms.get(row.key, 10.0), calls))
    monkeypatch.setattr(measure, "time_window", lambda runner, iters, device: runner.run(iters) or runner.ms)
    return calls, ms


def opts(**changes) -> argparse.Namespace:
    """Tiny benchmark options."""
    return argparse.Namespace(**{"batch_size": 16, "warmup": 1, "iters": 3, "windows": 2, "workers": 0, **changes})


def test_rows_are_warmed_up_then_timed_interleaved_in_rounds(fake_runners) -> None:
    calls, ms = fake_runners
    ms.update(baseline=20.0, **{"ours-1": 10.0})
    results, saved = [], []
    measure.measure_arch("resnet-8", select("baseline,ours-1,ours-1cl"), opts(), CPU, None, results, saved.append)
    order = ["baseline", "ours-1", "ours-1cl"]
    assert calls == [(k, 1) for k in order] + [(k, 3) for k in order] * 2
    assert saved == ["1 of 2 rounds of resnet-8", "2 of 2 rounds of resnet-8"]
    assert [r.windows_ms for r in results] == [[20.0, 20.0], [10.0, 10.0], [10.0, 10.0]]
    assert [r.speedup for r in results] == [1.0, 2.0, 2.0]


def test_a_benchmark_stopped_mid_way_leaves_a_partial_report(tmp_path: Path, fake_runners, monkeypatch) -> None:
    """The report is rewritten after every round and K, so a time limit's stop keeps what was finished."""

    def k_then_stop(spec, k, row, options, device) -> dict:
        if k == 2:
            raise KeyboardInterrupt  # what a time limit's signal does
        return {"arch": spec, "row": row.key, "k": k, "threads_per_process": 1, "status": "ok",
                "wall_s": 1.0, "img_per_s": 32.0}  # fmt: skip

    monkeypatch.setattr(cli, "measure_k", k_then_stop)
    args = ["--device", "cpu", "--arches", "resnet-8", "--configs", "baseline,ours-1", "--batch-size", "16",
            "--num-images", "16", "--windows", "2", "--ks", "1,2", "--k-arches", "resnet-8", "--k-num-images", "16",
            "--out", str(tmp_path), "--tag", "stopped"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    report = json.loads((tmp_path / "bench-stopped.json").read_text())
    assert report["meta"]["complete"] is False and report["meta"]["stage"] == "K=1 of resnet-8"
    assert [(r["row"]["key"], r["status"], len(r["windows_ms"])) for r in report["rows"]] == [
        ("baseline", "ok", 2), ("ours-1", "ok", 2)
    ]  # fmt: skip
    assert [e["k"] for e in report["k"]] == [1]
    md = (tmp_path / "bench-stopped.md").read_text()
    assert "Partial report" in md and "stopped after K=1 of resnet-8" in md and "| resnet-8 | ours-1 | 1 |" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_a_failed_k_process_is_reported_by_its_error(monkeypatch) -> None:
    """torch.multiprocessing.spawn ends the K processes when one fails and raises its traceback; the last line tells."""
    traceback = "\n\n-- Process 1 terminated with the following error:\nTraceback (...):\nRuntimeError: out of memory\n"

    def spawn_and_fail(*_args, **_kwargs) -> None:
        raise ProcessRaisedException(traceback, 1, 1234)

    monkeypatch.setattr(torch.multiprocessing, "spawn", spawn_and_fail)
    entry = measure.measure_k("resnet-8", 2, BY_KEY["ours-1"], opts(threads=1), CPU)
    assert entry == {"arch": "resnet-8", "row": "ours-1", "k": 2, "threads_per_process": 1, "status": "failed",
                     "note": "RuntimeError: out of memory"}  # fmt: skip


def test_rows_skip_where_they_cannot_run_and_say_why(monkeypatch) -> None:
    cuda = torch.device("cuda")
    assert skip_reason(BY_KEY["ours-5b"], CPU, 128) == skip_reason(BY_KEY["ours-4"], CPU, 128) == "CUDA only"
    assert skip_reason(BY_KEY["ours-1cl"], cuda, 128) == "CPU only"
    assert skip_reason(BY_KEY["ours-4"], cuda, 128) is None
    assert skip_reason(BY_KEY["ours-3g"], cuda, 64) == "needs a batch above 64 (--batch-size 64)"
    monkeypatch.setattr(rows, "cpu_has_native_bf16", lambda: False)  # bf16 emulated: the CPU profile's fp32 too
    assert skip_reason(BY_KEY["ours-3"], CPU, 128).startswith("bf16 is emulated on this CPU")
    assert skip_reason(BY_KEY["ours-1"], CPU, 128) is None
    assert skip_reason(BY_KEY["ours-3"], cuda, 128) is None
    monkeypatch.setattr(rows, "cpu_has_native_bf16", lambda: True)
    assert skip_reason(BY_KEY["ours-3"], CPU, 128) is None
    assert [r.key for r in select("ours-3,baseline")] == ["baseline", "ours-3"]  # table order
    with pytest.raises(SystemExit, match="unknown \\['ours-9'\\]"):
        select("ours-3,ours-9")


def test_the_papers_bn_statistics_row_trains_ghost_bn_over_64_images() -> None:
    """(3g) is (3) with model.bn_group=64, the paper's two-GPU BN statistics: what train.py builds for that key."""
    from resnet_repro.bench.measure import random_cifar
    from resnet_repro.bench.rows import make_runner
    from resnet_repro.models.ghost_bn import GhostBatchNorm2d

    arrays = random_cifar(128, 8)
    ghost = make_runner(replace(BY_KEY["ours-3g"], precision="fp32"), "resnet-8", arrays, CPU, 128, 0)  # fp32: fast
    bns = [m for m in ghost.iterate.step.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, GhostBatchNorm2d) and m.group_size == 64 for m in bns)
    ghost.run(1)
    plain = make_runner(BY_KEY["ours-3"], "resnet-8", arrays, CPU, 128, 0)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.iterate.step.model.modules())


def test_reports_name_the_commit_outside_git_when_told(tmp_path: Path, monkeypatch) -> None:
    """A tree copied without .git (the GPU machine's) records `$RESNET_REPRO_GIT_SHA`, else None."""
    from resnet_repro.tracking import GIT_SHA_ENV, git_sha

    monkeypatch.delenv(GIT_SHA_ENV, raising=False)
    assert git_sha(tmp_path) is None
    monkeypatch.setenv(GIT_SHA_ENV, "0123abc-dirty")
    assert git_sha(tmp_path) == "0123abc-dirty"


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="this checkout was copied without .git: git cannot answer")
def test_reports_name_the_commit_inside_git(monkeypatch) -> None:
    """Inside a git checkout the commit comes from git itself, whatever `$RESNET_REPRO_GIT_SHA` says."""
    from resnet_repro.tracking import GIT_SHA_ENV, git_sha

    monkeypatch.setenv(GIT_SHA_ENV, "0123abc-dirty")
    assert git_sha() not in (None, "0123abc-dirty")
