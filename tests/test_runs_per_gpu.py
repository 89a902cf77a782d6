"""K per GPU: a number, or `auto`, decided from a measurement once per kind of GPU and cached."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from resnet_repro import runs_per_gpu, sweep
from resnet_repro.bench.concurrency import KSettings
from resnet_repro.errors import ConfigError
from resnet_repro.runs_per_gpu import (
    RUNS_PER_GPU_ENV,
    decided_runs_per_gpu,
    parse_runs_per_gpu,
    runs_per_gpu_for_job,
    runs_per_gpu_for_launcher,
)

GPU = "H100 80 GiB | torch 2.x | CUDA 12 | resnet-56 ours-3 batch 128"


def rows(*img_per_s: float | None) -> list[dict]:
    """K = 1, 2, 4, 8 measured at these aggregate img/s (None: that K failed)."""
    return [
        {"arch": "ResNet-56", "k": k, "status": "ok", "img_per_s": v}
        if v is not None
        else {"arch": "ResNet-56", "k": k, "status": "failed", "note": "OOM"}
        for k, v in zip((1, 2, 4, 8), img_per_s)
    ]


class CountingMeasure:
    """A stand-in measurement that counts its calls."""

    def __init__(self, result: list[dict] | Exception, seconds: float = 0.0) -> None:
        self.result, self.seconds, self.calls = result, seconds, 0

    def __call__(self) -> list[dict]:
        self.calls += 1
        time.sleep(self.seconds)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize("raw", ["0", "-1", "two", "", "2.5"])
def test_runs_per_gpu_must_be_a_positive_integer_or_auto(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"RESNET_REPRO_RUNS_PER_GPU=.*positive integer.*'auto'"):
        parse_runs_per_gpu(raw)


def test_runs_per_gpu_accepts_integers_and_auto() -> None:
    assert parse_runs_per_gpu("4") == 4 and parse_runs_per_gpu(2) == 2
    assert parse_runs_per_gpu("auto") == parse_runs_per_gpu(" AUTO ") == "auto"


def test_auto_takes_the_smallest_k_near_the_best_and_measures_only_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "runs_per_gpu.json"
    measure = CountingMeasure(rows(1000.0, 1800.0, 2900.0, 3000.0))  # K=4 is within 10 % of K=8
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=measure) == 4
    entry = json.loads(cache.read_text())[GPU]
    assert entry["k"] == 4 and [r["k"] for r in entry["measured"]] == [1, 2, 4, 8] and entry["date"]
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=measure) == 4
    assert measure.calls == 1  # the second call read the cache
    other = CountingMeasure(rows(1000.0, 1050.0, 1000.0, 900.0))
    assert decided_runs_per_gpu(cache, key=lambda: "another GPU", measure=other) == 1  # K=2 gains under 10 %
    assert set(json.loads(cache.read_text())) == {GPU, "another GPU"}
    again = CountingMeasure(rows(1000.0, 2000.0, 2100.0, 2000.0))
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=again, again=True) == 2
    assert json.loads(cache.read_text())[GPU]["k"] == 2


def test_a_failed_k_is_left_out_and_a_failed_measurement_falls_back_to_one_uncached(tmp_path: Path) -> None:
    cache = tmp_path / "runs_per_gpu.json"
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=CountingMeasure(rows(1000.0, 2000.0, None))) == 2
    cache.unlink()
    broken = CountingMeasure(RuntimeError("worker did not get ready"))
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=broken) == 1
    assert not cache.exists()
    all_failed = CountingMeasure(rows(None, None, None, None))
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=all_failed) == 1
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=all_failed) == 1
    assert all_failed.calls == 2 and not cache.exists()  # nothing cached: the next sweep measures again


def test_an_unreadable_cache_is_measured_again_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "runs_per_gpu.json"
    cache.write_text("{not json")
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=CountingMeasure(rows(1.0, 3.0, 3.0, 3.0))) == 2
    assert json.loads(cache.read_text())[GPU]["k"] == 2


def test_concurrent_sweeps_wait_for_one_measurement(tmp_path: Path) -> None:
    """`make reproduce` starts its experiments' launchers seconds apart: only the first one measures."""
    cache = tmp_path / "runs_per_gpu.json"
    measure = CountingMeasure(rows(1000.0, 2000.0, 4000.0, 4100.0), seconds=0.5)
    decided: list[int] = []
    threads = [
        threading.Thread(target=lambda: decided.append(decided_runs_per_gpu(cache, key=lambda: GPU, measure=measure)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert decided == [4, 4, 4] and measure.calls == 1


def test_the_launcher_exports_its_k_so_its_jobs_take_as_many_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    assert runs_per_gpu_for_job() == 1  # no variable: one run per GPU
    monkeypatch.setattr(runs_per_gpu, "decided_runs_per_gpu", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sweep.local_jobs("auto") == 8
    assert runs_per_gpu_for_job() == 4  # what the launcher's jobs inherit
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "3")
    assert runs_per_gpu_for_launcher("3") == 3 and runs_per_gpu_for_job() == 3


def test_a_job_never_measures_it_takes_the_cached_k_or_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that finds `auto` (another launcher, or hydra.launcher.n_jobs given directly) only reads the cache."""
    monkeypatch.setenv(runs_per_gpu.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "auto")
    monkeypatch.setattr(runs_per_gpu, "calibration_key", lambda: GPU)
    with caplog.at_level("INFO", logger="resnet_repro.runs_per_gpu"):
        assert runs_per_gpu_for_job() == 1
    assert "no K cached" in caplog.text and "measuring" not in caplog.text
    assert not (tmp_path / "runs_per_gpu.json").exists()
    decided_runs_per_gpu(tmp_path / "runs_per_gpu.json", measure=CountingMeasure(rows(1.0, 3.0, 3.0, 3.0)))
    assert runs_per_gpu_for_job() == 2  # what the launcher measured and cached
    monkeypatch.setattr(runs_per_gpu, "calibration_key", lambda: 1 / 0)  # e.g. CUDA fails in the job
    assert runs_per_gpu_for_job() == 1


def test_a_cache_that_cannot_be_written_gives_one_run_per_gpu_not_a_failed_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(runs_per_gpu.CACHE_DIR_ENV, str(blocker / "cache"))  # its parent is a file
    monkeypatch.setattr(runs_per_gpu, "calibration_key", lambda: GPU)
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    assert runs_per_gpu_for_launcher("auto") == 1
    assert runs_per_gpu_for_job() == 1  # exported: the jobs do not try again


@pytest.mark.parametrize("entry", [{"k": 2}, "x", {"k": 0, "date": "d"}, {"k": "4", "date": "d"}])
def test_a_malformed_cache_entry_is_measured_again(tmp_path: Path, entry: object) -> None:
    cache = tmp_path / "runs_per_gpu.json"
    cache.write_text(json.dumps({GPU: entry}))
    measure = CountingMeasure(rows(1.0, 3.0, 3.0, 3.0))
    assert decided_runs_per_gpu(cache, key=lambda: GPU, measure=measure) == 2 and measure.calls == 1


def test_reproduce_decides_k_once_before_its_launchers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make reproduce LAUNCHER=local` starts several launchers: they inherit one decision instead of each
    measuring (or failing) in turn while the first one's runs train."""
    calls: list[int] = []
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    monkeypatch.setattr(runs_per_gpu, "decided_runs_per_gpu", lambda: calls.append(1) or 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs_per_gpu.decide_for_local_sweeps()
    assert calls == [] and RUNS_PER_GPU_ENV not in os.environ  # nothing without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    runs_per_gpu.decide_for_local_sweeps()
    assert os.environ[RUNS_PER_GPU_ENV] == "4"
    assert sweep.local_jobs(os.environ[RUNS_PER_GPU_ENV]) == 4 and calls == [1]  # a launcher started after it


def test_auto_measures_nothing_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_measuring() -> int:
        raise AssertionError("measured on a machine without a GPU")

    monkeypatch.setattr(runs_per_gpu, "decided_runs_per_gpu", no_measuring)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.local_jobs("auto") == 1
    with pytest.raises(ConfigError, match=RUNS_PER_GPU_ENV):
        sweep.local_jobs("none")  # a bad value is still an error here


def test_the_real_measurement_decides_and_caches_k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real K processes (shrunk to ResNet-8, a few iterations, on CPU): what `auto` runs on GPU 0."""
    monkeypatch.setattr(runs_per_gpu, "CANDIDATE_KS", (1, 2))
    monkeypatch.setattr(runs_per_gpu, "CALIBRATION_DEPTH", 8)
    tiny = KSettings(iters=2, batch_size=16, num_images=32, warmup=1, threads=1, timeout_s=120.0)
    monkeypatch.setattr(runs_per_gpu, "CALIBRATION_SETTINGS", tiny)
    cache = tmp_path / "runs_per_gpu.json"
    k = decided_runs_per_gpu(
        cache, key=lambda: "cpu", measure=lambda: runs_per_gpu.measure_throughputs(torch.device("cpu"))
    )
    entry = json.loads(cache.read_text())["cpu"]
    assert k == entry["k"] in (1, 2)
    assert [(r["k"], r["status"], r["arch"], r["iters_per_process"]) for r in entry["measured"]] == [
        (1, "ok", "ResNet-8", 2),
        (2, "ok", "ResNet-8", 2),
    ]
