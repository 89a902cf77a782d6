"""K, the runs a local sweep trains at once on each GPU: a number, or `auto`, measured on this kind of GPU once.

`$RESNET_REPRO_RUNS_PER_GPU` sets it; configs/hydra/launcher/local.yaml defaults to `auto`. `auto` times
K = 1, 2, 4, 8 processes training ResNet-56 with train.py's CUDA step at once on GPU 0 (the code of
`make bench`'s K table, resnet_repro/bench/concurrency.py, 200 iterations per process) and takes the smallest K
whose aggregate img/s is within 10 % of the best (`recommend_k`). The decision and its measurement are cached in
`$RESNET_REPRO_CACHE_DIR/runs_per_gpu.json` (default ~/.cache/resnet_repro), keyed by the GPU's name, torch,
CUDA and the workload, so each kind of machine measures once (about a minute); delete the entry, or run
`python -m resnet_repro.runs_per_gpu --again`, to measure again. A measurement that yields no K falls back to 1
and is not cached.

The launcher's process decides (sweep.local_jobs, the resolver behind `n_jobs`; `make reproduce LAUNCHER=local`
decides once before its launchers start) and exports the number it chose, so the jobs it starts hold at most that
many slots per GPU (gpu_slots.py). A job never measures: one that finds `auto` itself (another launcher, or
`hydra.launcher.n_jobs=N` given directly) takes the cached K, or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resnet_repro.bench.concurrency import KSettings, measure_concurrency, recommend_k
from resnet_repro.checkpoint import atomic_write_json
from resnet_repro.errors import ConfigError
from resnet_repro.gpu_slots import exclusive_lock
from resnet_repro.tracking import now_iso

log = logging.getLogger(__name__)

RUNS_PER_GPU_ENV = "RESNET_REPRO_RUNS_PER_GPU"
CACHE_DIR_ENV = "RESNET_REPRO_CACHE_DIR"
AUTO = "auto"
CANDIDATE_KS = (1, 2, 4, 8)
# The workload K is chosen for: the middle of the paper's depths, the step train.py runs on CUDA by default.
CALIBRATION_ARCH, CALIBRATION_DEPTH, CALIBRATION_CONFIG = "resnet", 56, "ours-3"
CALIBRATION_SETTINGS = KSettings(iters=200, timeout_s=300.0)  # 200 iterations per process and K after a warm-up

Measure = Callable[[], list[dict[str, Any]]]


def parse_runs_per_gpu(raw: int | str) -> int | str:
    """K as given in `$RESNET_REPRO_RUNS_PER_GPU`: a positive integer or `auto`; ConfigError naming the variable
    otherwise."""
    if str(raw).strip().lower() == AUTO:
        return AUTO
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{RUNS_PER_GPU_ENV}={raw!r} is not valid: a positive integer (runs at once per GPU) or {AUTO!r} "
            "(measured on this GPU once, then cached)"
        )
    return value


def runs_per_gpu_for_job() -> int:
    """K for a sweep job's slot (gpu_slots.py): `$RESNET_REPRO_RUNS_PER_GPU` (default 1). A job never measures:
    `auto` here (a launcher that did not decide it) is the cached K, or 1 without one."""
    requested = parse_runs_per_gpu(os.environ.get(RUNS_PER_GPU_ENV, "1"))
    if requested != AUTO:
        return int(requested)
    try:
        return decided_runs_per_gpu(measure=None)
    except Exception as exc:  # noqa: BLE001 - a job trains with one slot rather than fail over its cache
        log.warning("%s=auto: no cached K (%s); 1 run per GPU", RUNS_PER_GPU_ENV, exc)
        return 1


def runs_per_gpu_for_launcher(raw: int | str) -> int:
    """K for a local launcher on a machine with a GPU; `auto` is decided here (a failure of any kind gives 1, with a
    warning) and exported to `$RESNET_REPRO_RUNS_PER_GPU`, so that the jobs this process starts, and the launchers
    `make reproduce` starts after it, take the same K without measuring again."""
    requested = parse_runs_per_gpu(raw)
    if requested != AUTO:
        return int(requested)
    try:
        k = decided_runs_per_gpu()
    except Exception as exc:  # noqa: BLE001 - e.g. an unwritable cache folder: the sweep runs with K = 1
        log.warning("%s=auto: K could not be decided (%s: %s); 1 run per GPU", RUNS_PER_GPU_ENV, type(exc).__name__,
                    exc)  # fmt: skip
        k = 1
    os.environ[RUNS_PER_GPU_ENV] = str(k)
    return k


def decide_for_local_sweeps() -> None:
    """For `make reproduce LAUNCHER=local`: decide K once, before the experiments' launchers start (a few seconds
    apart), so that none of them measures while another one's runs train, and a failed measurement is not retried
    by each; they inherit the number. Nothing happens without a GPU."""
    if torch.cuda.is_available():
        runs_per_gpu_for_launcher(os.environ.get(RUNS_PER_GPU_ENV, AUTO))


def cache_path() -> Path:
    """`$RESNET_REPRO_CACHE_DIR/runs_per_gpu.json`, by default in ~/.cache/resnet_repro."""
    root = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        "resnet_repro"
    )
    return Path(root) / "runs_per_gpu.json"


def calibration_key() -> str:
    """What a cached K holds for: GPU 0's name and memory, torch and CUDA, and the workload measured."""
    props = torch.cuda.get_device_properties(0)
    workload = f"{CALIBRATION_ARCH}-{CALIBRATION_DEPTH} {CALIBRATION_CONFIG} batch {CALIBRATION_SETTINGS.batch_size}"
    return (
        f"{props.name} {props.total_memory // 2**30} GiB | torch {torch.__version__} | CUDA {torch.version.cuda} "
        f"| {workload}"
    )


def measure_throughputs(device: torch.device | None = None) -> list[dict[str, Any]]:
    """Aggregate img/s of K = 1, 2, 4, 8 processes training the calibration workload at once on `device` (GPU 0)."""
    with tempfile.TemporaryDirectory(prefix="resnet_repro-k-") as tmp:
        return measure_concurrency(
            CALIBRATION_ARCH,
            CALIBRATION_DEPTH,
            list(CANDIDATE_KS),
            CALIBRATION_SETTINGS,
            device or torch.device("cuda", 0),
            CALIBRATION_CONFIG,
            Path(tmp),
        )


def decided_runs_per_gpu(
    path: Path | None = None,
    key: Callable[[], str] | None = None,
    measure: Measure | None = measure_throughputs,
    again: bool = False,
) -> int:
    """The cached K for this GPU (`key`, default calibration_key); measured (and cached) when there is none or
    `again`, or 1 when `measure` is None.
    Concurrent callers wait for one measurement (a lock beside the cache), since measurements at the same time
    would disturb each other."""
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    name = (key or calibration_key)()
    with exclusive_lock(path.with_name(path.name + ".lock")):
        entries = _read(path)
        entry = entries.get(name)
        if _valid(entry) and not again:
            log.info("%s=auto: %d runs per GPU, measured %s (cached in %s)", RUNS_PER_GPU_ENV, entry["k"],
                     entry["date"], path)  # fmt: skip
            return int(entry["k"])
        if measure is None:
            log.info("%s=auto: no K cached for %s in %s; 1 run per GPU", RUNS_PER_GPU_ENV, name, path)
            return 1
        ks = ", ".join(map(str, CANDIDATE_KS))
        log.info("%s=auto: measuring K = %s on GPU 0 (%s), once for this GPU", RUNS_PER_GPU_ENV, ks, name)
        entry = _measured_entry(measure)
        if entry["k"] is None:
            log.warning("%s=auto: no K measured (%s); training 1 run per GPU", RUNS_PER_GPU_ENV, entry["why"])
            return 1
        entries[name] = entry
        atomic_write_json(path, entries)
    log.info(
        "%s=auto: %d runs per GPU (%s; aggregate img/s %s); cached in %s, set %s=N to choose yourself",
        RUNS_PER_GPU_ENV, entry["k"], entry["why"], _throughputs(entry["measured"]), path, RUNS_PER_GPU_ENV,
    )  # fmt: skip
    return int(entry["k"])


def _measured_entry(measure: Measure) -> dict[str, Any]:
    """A cache entry from one measurement: K (None when no K could be measured), why, the rows, the date."""
    try:
        rows = measure()
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not stop the sweep: K falls back to 1
        return {"k": None, "why": f"{type(exc).__name__}: {exc}"}
    recommendation = recommend_k(rows, torch.device("cuda"))
    failed = [f"K={r['k']}: {r.get('note', '')}" for r in rows if r.get("status") != "ok"]
    why = recommendation["why"] if recommendation["k"] else "every K failed: " + "; ".join(failed)
    return {"k": recommendation["k"], "why": why, "measured": rows, "date": now_iso()}


def _valid(entry: Any) -> bool:
    """A cache entry this module wrote: a dict with a positive integer K and a date."""
    return isinstance(entry, dict) and isinstance(entry.get("k"), int) and entry["k"] >= 1 and "date" in entry


def _throughputs(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"K={r['k']} {r['img_per_s']:,.0f}" if r.get("status") == "ok" else f"K={r['k']} failed"
                     for r in rows)  # fmt: skip


def _read(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable cache counts as empty (it is measured again and rewritten)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): measuring again", path, exc)
        return {}
    return entries if isinstance(entries, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """`python -m resnet_repro.runs_per_gpu [--again]`: print the K that `auto` gives on this machine (measured
    first when none is cached, or with --again)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--again", action="store_true", help="measure again, even if the cache has an entry")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: a local sweep trains 1 run at a time")
        return 0
    print(decided_runs_per_gpu(again=args.again))
    return 0


if __name__ == "__main__":
    sys.exit(main())
