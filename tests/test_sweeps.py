"""Sweeps are safe to rerun: one directory per run, finished runs skipped untouched, a failed run never stops the
others and is reported; `make reproduce` prints and runs the right commands.

The sweeps are real (`python -m resnet_repro.train -m ...` in a subprocess) on tiny nets: depth 8, 10 iterations of
16 images of the CIFAR-10 sample.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fault_injection.sitecustomize as faults
import pytest

from resnet_repro import reproduce
from resnet_repro.device import cpu_speed_overrides
from resnet_repro.results import unique_runs
from resnet_repro.run_dir import PLAN_JSON, SUMMARY_JSON
from resnet_repro.sweep import EXIT_SWEEP_FAILED, PlannedRun, format_summary, run_status

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.depth=8",
    "data.batch_size=16",
    "optim.max_iter=10",
    "optim.milestones=[5,8]",
    "trainer.log_every=5",
    "trainer.eval_every=10",
    "trainer.checkpoint_every=10",
    "trainer.threads=1",
    "trainer.progress=false",
    "responses=false",
]


def sweep(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m resnet_repro.train -m ARGS` from the repository root; output captured."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_repro.train", "-m", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: its bytes and mtime in ns."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def submitit_sweep(sample_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Experiment `quick` at depth 8 (plain and ResNet: 2 runs) through hydra/launcher=submitit_local."""
    runs = tmp_path_factory.mktemp("runs")
    args = ["experiment=quick", "hydra/launcher=submitit_local", f"runs_dir={runs}", "data=npz",
            f"data.path={sample_npz}", *TINY]
    return {"args": args, "sweep_dir": runs / "cifar10-sample" / "quick", "first": sweep(args)}


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_submitit_sweep_writes_one_directory_per_run(submitit_sweep: dict) -> None:
    first, sweep_dir = submitit_sweep["first"], submitit_sweep["sweep_dir"]
    assert first.returncode == 0, first.stdout + first.stderr
    dirs = run_dirs(sweep_dir)
    assert len(dirs) == 2
    for d, arch in zip(dirs, ("plain", "resnet")):  # the sweep values are in the directory names
        assert d.name.startswith(f"data.batch_size=16,data=npz,model.arch={arch},model.depth=8,optim.max_iter=10,")
        metrics = json.loads((d / "metrics.json").read_text())
        assert [metrics[k] for k in ("arch", "depth", "iterations", "experiment")] == [arch, 8, 10, "quick"]
    summary = json.loads((sweep_dir / SUMMARY_JSON).read_text())
    assert summary["counts"] == {"finished": 2, "skipped": 0, "failed": 0, "incomplete": 0}
    assert "2 runs, 2 finished, 0 skipped, 0 failed, 0 incomplete" in first.stdout
    plan = json.loads((sweep_dir / PLAN_JSON).read_text())  # written at the start, for a launcher that dies
    assert plan["pid"] == summary["pid"] and sorted(Path(r["dir"]) for r in plan["runs"]) == dirs


def test_relaunch_skips_finished_runs_untouched(submitit_sweep: dict) -> None:
    assert submitit_sweep["first"].returncode == 0
    dirs = run_dirs(submitit_sweep["sweep_dir"])
    before = {d: snapshot(d) for d in dirs}
    again = sweep(submitit_sweep["args"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 0 finished, 2 skipped, 0 failed, 0 incomplete" in again.stdout
    assert run_dirs(submitit_sweep["sweep_dir"]) == dirs
    for d in dirs:
        assert snapshot(d) == before[d]  # same files, same bytes, same mtimes


def test_failed_run_is_reported_while_the_others_finish(sample_npz: Path, tmp_path: Path, monkeypatch) -> None:
    # basic launcher (one process, jobs in turn): the failing job comes first and the next one still runs
    faults.arm_subprocesses(monkeypatch, "step@3/raise")  # an exception before iteration 3: only the 10-iteration run
    tiny = [a for a in TINY if not a.startswith(("optim.max_iter=", "optim.milestones="))]
    result = sweep(["experiment=quick", "model.arch=resnet", "optim.max_iter=10,3", "optim.milestones=[2]",
                    f"runs_dir={tmp_path}", "data=npz", f"data.path={sample_npz}", *tiny])
    assert result.returncode == EXIT_SWEEP_FAILED, result.stdout + result.stderr
    sweep_dir = tmp_path / "cifar10-sample" / "quick"
    failed, finished = (next(sweep_dir.glob(f"*,model.arch=resnet,*,optim.max_iter={v},*")) for v in (10, 3))
    assert (failed / "failed.json").is_file() and not (failed / "metrics.json").exists()
    assert (finished / "metrics.json").is_file() and not (finished / "failed.json").exists()
    assert "2 runs, 1 finished, 0 skipped, 1 failed, 0 incomplete" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("failed "))
    assert failed.name in line and "fault injected at iteration 3" in line
    summary = json.loads((tmp_path / "cifar10-sample" / "quick" / SUMMARY_JSON).read_text())
    assert {r["name"]: r["status"] for r in summary["runs"]} == {failed.name: "failed", finished.name: "finished"}
    assert "1 failed" in (tmp_path / "cifar10-sample" / "quick" / "sweeps.log").read_text()


def test_summary_tells_stale_failures_and_missing_runs_apart(tmp_path: Path) -> None:
    stale, missing = tmp_path / "stale", tmp_path / "missing"
    stale.mkdir()
    (stale / "failed.json").write_text(json.dumps({"error": "RuntimeError: old"}))
    state = (stale / "failed.json").stat()  # unchanged since the sweep started: not written by this sweep
    rows = [
        run_status(PlannedRun([], "stale", stale), {"metrics": False, "failed": (state.st_mtime_ns, state.st_size)}),
        run_status(PlannedRun([], "missing", missing), {"metrics": False, "failed": None}),
    ]
    assert [r["status"] for r in rows] == ["incomplete", "incomplete"]
    assert "earlier attempt failed: RuntimeError: old" in rows[0]["error"]
    text = format_summary(str(tmp_path), rows)
    assert "2 runs, 0 finished, 0 skipped, 0 failed, 2 incomplete" in text and "Rerun the same command" in text


def test_reproduce_dry_run_prints_the_commands(capsys: pytest.CaptureFixture) -> None:
    assert reproduce.main(["--profile", "paper", "--dry-run", "--launcher", "slurm", "--runs-dir", "R"]) == 0
    lines = capsys.readouterr().out.splitlines()
    py = sys.executable
    root = (Path.cwd() / "data").resolve()
    assert lines[0] == shlex.join([py, "-m", "resnet_repro.download", "--root", "./data"])
    experiments = [["fig6_plain"], ["table6"], ["shortcuts", "model.shortcut=B,C"], ["fig6_deep", "model.depth=1202"]]
    assert lines[1:5] == [
        shlex.join([py, "-m", "resnet_repro.train", "-m", f"experiment={e}", *more, "runs_dir=R", f"data.root={root}",
                    "hydra/launcher=slurm", "trainer.device=cuda"])
        for e, *more in experiments
    ]
    assert lines[5].startswith(shlex.join([py, "-m", "resnet_repro.plot"]))
    assert lines[5].endswith("--out results/cifar-10/paper")

    label = "CIFAR-10 sample (5,085 train / 1,017 test)"
    assert reproduce.main(["--profile", "quick", "--dry-run", "--data", "x.npz", "--label", label,
                           "trainer.threads=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == shlex.join([py, "-m", "resnet_repro.train", "-m", "experiment=quick", "runs_dir=runs",
                                   "data=npz", f"data.path={Path('x.npz').resolve()}", f'data.label="{label}"',
                                   "trainer.device=cpu", *cpu_speed_overrides(), "trainer.threads=1"])
    assert "--out results/cifar-10-sample-5085-train-1017-test/quick --title-suffix" in lines[1]
    assert "quick profile: shortened, lr 0.02" in lines[1]


def test_the_paper_profile_refuses_to_start_without_a_gpu(monkeypatch, tmp_path: Path, capsys) -> None:
    """Its runs are pinned to trainer.device=cuda; with no GPU visible (here: none) it stops before the download,
    saying why and what to do; trainer.device=cpu on the command line overrides both."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--profile", "paper", "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")]
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err
    assert "trainer.device=cuda" in err and "sees no GPU" in err and "--profile quick" in err
    assert "trainer.device=cpu" in err and not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    assert reproduce.main([*args, "--dry-run", "trainer.device=cpu"]) == 0
    commands = capsys.readouterr().out.splitlines()[1:5]
    assert all(c.endswith("trainer.device=cpu") and "trainer.device=cuda" not in c for c in commands)
    for insist in ("trainer.device=cpu", "++trainer.device=cpu"):
        assert reproduce.missing_gpu(reproduce.parse_args([*args, insist])) is None
    assert reproduce.missing_gpu(reproduce.parse_args(["--profile", "quick"])) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_reproduce_stops_the_launchers_workers_too(tmp_path: Path, sig: int) -> None:
    """SIGTERM or Ctrl-C to reproduce reaches every process of the running command as SIGTERM, also a worker
    process the command started (as joblib's are), which would otherwise train on as an orphan."""
    ready, got = tmp_path / "ready", tmp_path / "got"
    worker = (f"import signal, sys, time, pathlib\n"
              f"def on_term(*a):\n    pathlib.Path({str(got)!r}).write_text('TERM')\n    sys.exit(3)\n"
              f"signal.signal(signal.SIGTERM, on_term)\n"
              f"pathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(60)")  # fmt: skip
    command = [sys.executable, "-c",
               f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {worker!r}]))"]  # fmt: skip
    step = reproduce.Step("sweep", command)
    deadline = time.monotonic() + 30
    threading.Thread(target=lambda: _signal_when(ready, sig, deadline), daemon=True).start()
    with pytest.raises(reproduce.Stopped, match=signal.Signals(sig).name):
        reproduce.run_steps([step], [None])
    assert got.read_text() == "TERM" and step.status == "failed"


def _signal_when(path: Path, sig: int, deadline: float) -> None:
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), sig)


def test_a_sweep_whose_launcher_died_still_gives_its_finished_runs_to_the_plot(tmp_path: Path) -> None:
    """No sweep_summary.json (joblib lost a worker, a job array failed): the runs planned at the start that hold
    results are drawn, the others reported missing; a plan or summary of another process does not count."""
    done, diverged, never = tmp_path / "done", tmp_path / "diverged", tmp_path / "never"
    for d in (done, diverged, never):
        d.mkdir()
    (done / "metrics.json").write_text("{}")
    (diverged / "failed.json").write_text("{}")
    plan = {"pid": 4242, "runs": [{"name": d.name, "dir": str(d)} for d in (done, diverged, never)]}
    (tmp_path / PLAN_JSON).write_text(json.dumps(plan))
    step = reproduce.Step("experiment table6", ["true"], experiment="table6")
    reproduce.collect_results(step, tmp_path, pid=4242)
    assert step.status == "failed" and step.run_dirs == [str(done), str(diverged)]
    assert "no sweep summary" in step.note and "2 of its 3 planned runs" in step.note
    other = reproduce.Step("experiment table6", ["true"], experiment="table6")
    reproduce.collect_results(other, tmp_path, pid=1)  # an older sweep's plan
    assert other.run_dirs == [] and "no sweep summary or plan" in other.note


def test_identical_runs_of_two_experiments_are_drawn_once(tmp_path: Path) -> None:
    def run(experiment: str, seed: int, name: str, precision: str = "bf16") -> Path:
        d = tmp_path / experiment / name
        d.mkdir(parents=True)
        config = {"experiment": experiment, "runs_dir": "runs", "seed": seed, "model": {"depth": 20},
                  "trainer": {"threads": 1}, "responses": experiment == "fig7"}
        (d / "metrics.json").write_text(json.dumps({"config": config, "precision": precision}))
        return d

    a, b, c = run("fig6_resnet", 0, "model.depth=20"), run("table6", 0, "model.depth=20,seed=0"), run("table6", 1, "s1")
    fp32 = run("fp32", 0, "model.depth=20", precision="fp32")  # same config, other arithmetic: another run
    failed = tmp_path / "table6" / "broken"
    failed.mkdir()
    (failed / "failed.json").write_text("{}")
    kept, dropped = unique_runs([a, b, c, fp32, failed, a])
    assert kept == [a, c, fp32, failed] and dropped == [(b, a)]


@pytest.mark.slow
def test_reproduce_quick_profile_end_to_end(sample_npz: Path, tmp_path: Path) -> None:
    code = reproduce.main(["--profile", "quick", "--data", str(sample_npz), "--label", "sample, tiny",
                           "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), *TINY])
    assert code == 0
    out = tmp_path / "results" / "sample-tiny" / "quick"
    assert {"fig6.png", "fig7.png", "table6.md", "verdict.md", "reproduce.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "reproduce.json").read_text())
    assert len(record["runs_drawn"]) == 2 and [s["status"] for s in record["steps"]] == ["ok", "ok"]


def test_with_a_concurrent_launcher_the_experiments_run_together(sample_npz: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:  # fmt: skip
    """--launcher local: the experiments run at the same time, the longest (last in the profile) launched first
    (their jobs then share the GPUs by slots, so no GPU idles while one experiment waits for its longest run),
    each one's output in its reproduce.log; the results are collected from each sweep as one at a time would."""
    two = (reproduce.Experiment("quick", ("model.arch=resnet",)), reproduce.Experiment("smoke"))
    monkeypatch.setitem(reproduce.PROFILES, "two", two)
    monkeypatch.setitem(reproduce.TITLE_SUFFIX, "two", "")
    monkeypatch.setattr(reproduce, "LAUNCH_STAGGER_S", 0.0)
    runs = tmp_path / "runs"
    code = reproduce.main(["--profile", "two", "--data", str(sample_npz), "--label", "sample", "--launcher", "local",
                           "--runs-dir", str(runs), "--results-dir", str(tmp_path / "results"), *TINY])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("=== [2/3] experiment smoke:") < out.index("=== [1/3] experiment quick:")  # longest first
    spans = {}
    for experiment in ("quick", "smoke"):
        assert "Sweep summary" in (runs / "sample" / experiment / reproduce.REPRODUCE_LOG).read_text()
        assert len(list((runs / "sample" / experiment).glob("*/metrics.json"))) == 1
        summary = json.loads((runs / "sample" / experiment / SUMMARY_JSON).read_text())
        spans[experiment] = (summary["started"], summary["ended"])
    assert spans["quick"][0] <= spans["smoke"][1] and spans["smoke"][0] <= spans["quick"][1]  # the sweeps overlapped
    record = json.loads((tmp_path / "results" / "sample" / "two" / "reproduce.json").read_text())
    assert len(record["runs_drawn"]) == 2 and [s["status"] for s in record["steps"]] == ["ok", "ok", "ok"]


def test_a_closed_terminal_stops_reproduce_cleanly(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed): the commands get SIGTERM and reproduce ends with Stopped. (Its own output
    then goes to /dev/null, since writes to a closed terminal fail; here stdout is a pipe, so that part is not
    exercised.)"""
    marker = tmp_path / "marker"
    script = (
        "import os, signal, sys, threading\n"
        "from resnet_repro import reproduce\n"
        "step = reproduce.Step('sweep', [sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGHUP)).start()\n"
        "try:\n"
        "    reproduce.run_steps([step], [None])\n"
        "except reproduce.Stopped as exc:\n"
        f"    open({str(marker)!r}, 'w').write(f'{{step.rc}} {{exc}}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(reproduce.__file__).parents[1], timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, message = marker.read_text().split(" ", 1)
    assert rc == str(-signal.SIGTERM) and "stopped by SIGHUP" in message
