"""Sweep bookkeeping: which run directories a multirun will use, and what happened to each of them.

`SweepSummary`, a Hydra callback (configs/train.yaml, `hydra.callbacks`), lists the sweep's run directories when a
multirun starts (as Hydra's basic sweeper combines the experiment file's parameters with the command line) and notes
which are finished. At the end it prints one line per run, appends it to `<sweep dir>/sweeps.log`, writes
`<sweep dir>/sweep_summary.json` and exits with status 4 (EXIT_SWEEP_FAILED) when a run failed or is incomplete:

- finished: metrics.json was written during this sweep;
- skipped: metrics.json existed before the sweep started (train.py does not train it again);
- failed: failed.json was written during this sweep (its error line is shown);
- incomplete: neither (killed, never started, or its job crashed); rerunning the same command resumes it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from resnet_repro.checkpoint import atomic_write_json
from resnet_repro.run_dir import FAILED_NAME, METRICS_NAME, PLAN_JSON, SUMMARY_JSON, SUMMARY_LOG, holder
from resnet_repro.tracking import now_iso

STATUSES = ("finished", "skipped", "failed", "incomplete")
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# The state of a job squeue no longer lists: it has ended, and submitit reads its result file (or reports its log).
SQUEUE_GONE_STATE = "ENDED"
EXIT_SWEEP_FAILED = 4  # failed or incomplete runs at the end (train.py: 1 failed, 2 config, 3 preempted, 5 busy)


@dataclass
class PlannedRun:
    """One job of a sweep: its overrides (as the launcher gets them) and its run directory."""

    overrides: list[str]
    name: str
    dir: Path


def _file_state(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, or None when it does not exist; compared, never read as a clock."""
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    return None


def planned_runs(config: DictConfig) -> list[PlannedRun]:
    """The run directories of the multirun described by `config` (the composed multirun config, hydra node included).

    Its jobs are split as Hydra's basic sweeper does: the product of every key's values, a later value of a key (the
    command line's, `hydra.overrides.task`) replacing an earlier one (the experiment file's `hydra.sweeper.params`).
    Each job's `hydra.sweep.dir` / `hydra.sweep.subdir` is resolved for its override_dirname, by Hydra's rule: its
    overrides less `exclude_keys`, sorted, joined with `item_sep`, each `=` replaced by `kv_sep`."""
    hc, parser = config.hydra, OverridesParser.create()
    params = [f"{key}={value}" for key, value in (hc.sweeper.get("params") or {}).items()]
    values: dict[str, list[str]] = {}
    for o in parser.parse_overrides(params + list(hc.overrides.task)):
        key = o.get_key_element()
        swept = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        values[key] = [f"{key}={value}" for value in swept]
    naming, saved, runs = hc.job.config.override_dirname, HydraConfig.instance().cfg, []
    try:
        for num, job in enumerate(map(list, itertools.product(*values.values()))):
            kept = sorted(
                str(o.input_line) for o in parser.parse_overrides(job) if o.key_or_group not in naming.exclude_keys
            )
            job_cfg = copy.deepcopy(config)
            OmegaConf.set_readonly(job_cfg.hydra, False)
            with open_dict(job_cfg.hydra):
                job_cfg.hydra.job.override_dirname = naming.item_sep.join(kept).replace("=", naming.kv_sep)
                job_cfg.hydra.job.num = num
            # `${hydra:...}` in the sweep directories reads the HydraConfig singleton: set to each job's config, as
            # Hydra's launchers do (hydra.core.utils.run_job), and restored after
            HydraConfig.instance().set_config(job_cfg)
            run_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
            runs.append(PlannedRun(job, run_dir.name, run_dir))
    finally:
        HydraConfig.instance().cfg = saved
    return runs


def run_status(run: PlannedRun, before: dict[str, Any]) -> dict[str, Any]:
    """Status of one planned run now, given what its directory held before the sweep (see the module docstring)."""
    metrics, failed = run.dir / METRICS_NAME, run.dir / FAILED_NAME
    row: dict[str, Any] = {"name": run.name, "dir": str(run.dir), "overrides": run.overrides, "error": None}
    if metrics.is_file():
        row["status"] = "skipped" if before["metrics"] else "finished"
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(metrics.read_text())
            row.update(test_err=done.get("final_test_err"), train_err=done.get("final_train_err"))
            row["wall_s"] = done.get("wall_time_s")
    elif (failed_now := _file_state(failed)) is not None:
        try:
            error = json.loads(failed.read_text()).get("error", "unknown error")
        except (OSError, ValueError):
            error = "unreadable failed.json"
        if failed_now != before["failed"]:
            row.update(status="failed", error=error)
        else:
            row.update(status="incomplete", error=f"not run by this sweep; an earlier attempt failed: {error}")
    else:
        busy = holder(run.dir)
        row.update(status="incomplete", error=busy and f"being trained by {busy} (another launch of this sweep?)")
    return row


def format_summary(sweep_dir: str, rows: list[dict[str, Any]]) -> str:
    """The printed summary: a header with counts and one line per run."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = [f"Sweep summary for {sweep_dir}: {len(rows)} runs, " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        detail = ""
        if r["status"] in ("failed", "incomplete"):
            detail = r["error"] or "no metrics.json or failed.json; rerun the same command to resume it"
        elif r.get("test_err") is not None:
            detail = f"test err {r['test_err']:.2f}%  train err {r['train_err']:.2f}%"
            detail += "  (metrics.json existed before this sweep)" if r["status"] == "skipped" else ""
        lines.append(f"  {r['status']:<10}  {r['name']:<{width}}  {detail}".rstrip())
    if counts["failed"] or counts["incomplete"]:
        lines.append("Rerun the same command: failed runs are retried, incomplete ones resumed, finished ones skipped.")
    return "\n".join(lines)


def _squeue_watcher_class() -> type:
    """submitit's SlurmInfoWatcher, reading job states from squeue (defined here: submitit is an optional extra)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        """Job states from `squeue --states=all` (which lists every job the controller still holds, MinJobAge after
        its end) instead of `sacct`, for clusters without accounting. A job squeue no longer lists has ended."""

        def _make_command(self) -> list[str] | None:
            if super()._make_command() is None:  # no job left to follow
                return None
            return ["squeue", "--noheader", "--array", "--states=all", f"--user={os.getuid()}",
                    "--format=%i|%T|%N"]  # fmt: skip

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            info = super().read_info("JobID|State|NodeList\n" + text)  # sacct's header, so sacct's parser reads it
            for job_id in self._registered - self._finished:
                if job_id not in info:
                    info[job_id] = {"JobID": job_id, "State": SQUEUE_GONE_STATE, "NodeList": ""}
            return info

    return SqueueWatcher


def use_squeue_without_slurm_accounting(config: DictConfig) -> None:
    """Under hydra/launcher=slurm on a cluster without accounting (a single-machine Slurm, as `scontrol show config`
    tells), make submitit follow its jobs with squeue: its `sacct` polls would fail with a warning each, and a job
    that died without a result file would be waited for forever. Clusters with accounting keep sacct."""
    if OmegaConf.select(config, "hydra.launcher._target_", default=None) != SLURM_LAUNCHER:
        return
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):  # no Slurm here, or it cannot be asked
        return
    if re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none\s*$", out, flags=re.MULTILINE):
        from submitit.slurm import slurm

        watcher_class = _squeue_watcher_class()
        if type(slurm.SlurmJob.watcher).__name__ != watcher_class.__name__:  # once per process
            slurm.SlurmJob.watcher = watcher_class(delay_s=600)  # submitit's own delay for its SlurmJob watcher


class SweepSummary(Callback):
    """Hydra callback: note finished runs when a multirun starts; print, log and save a summary when it ends."""

    runs: list[PlannedRun] | None = None
    plan_error: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Plan the run directories and record which already hold metrics.json / failed.json."""
        self.started = now_iso()
        try:
            use_squeue_without_slurm_accounting(config)
        except Exception as exc:  # noqa: BLE001 - submitit's own sacct polling still works, only noisier
            print(f"warning: job states stay with sacct ({type(exc).__name__}: {exc})", file=sys.stderr)
        try:
            self.runs = planned_runs(config)
        except Exception as exc:  # noqa: BLE001 - a summary must never stop a sweep
            self.plan_error = f"{type(exc).__name__}: {exc}"
            return
        self.before = {
            r.dir: {"metrics": (r.dir / METRICS_NAME).is_file(), "failed": _file_state(r.dir / FAILED_NAME)}
            for r in self.runs
        }
        # if the launcher itself dies (a lost worker, a failed job array), no summary is written: the plan still
        # tells `reproduce` which directories belong to this sweep
        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs = [{"name": r.name, "dir": str(r.dir)} for r in self.runs]
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(sweep_dir / PLAN_JSON, {"pid": os.getpid(), "started": self.started, "runs": runs})
        except OSError as exc:
            print(f"warning: could not write the sweep plan into {sweep_dir}: {exc}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the summary, append it to sweeps.log, write sweep_summary.json; exit 4 if a run did not finish."""
        sweep_dir = str(config.hydra.sweep.dir)
        if self.runs is None:
            print(f"Sweep summary for {sweep_dir} unavailable (could not plan the runs: {self.plan_error})")
            return
        rows = [run_status(r, self.before[r.dir]) for r in self.runs]
        text = format_summary(sweep_dir, rows)
        print(text, flush=True)
        overrides, ended = list(config.hydra.overrides.task), now_iso()
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        summary = {"sweep_dir": sweep_dir, "command_overrides": overrides, "started": self.started, "ended": ended,
                   "pid": os.getpid(), "counts": counts, "runs": rows}  # fmt: skip
        try:
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(sweep_dir) / SUMMARY_JSON, summary)
            with open(Path(sweep_dir) / SUMMARY_LOG, "a") as f:
                f.write(f"[{ended}] overrides: {' '.join(overrides)}\n{text}\n\n")
        except OSError as exc:
            print(f"warning: could not write the sweep summary into {sweep_dir}: {exc}", file=sys.stderr)
        if counts["failed"] or counts["incomplete"]:
            sys.exit(EXIT_SWEEP_FAILED)
