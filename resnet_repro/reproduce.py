"""`make reproduce`: download CIFAR-10, run every experiment of a profile as a Hydra multirun, draw the results.

    python -m resnet_repro.reproduce --profile paper                      # GPU box: the paper's experiments
    python -m resnet_repro.reproduce --profile quick --data FILE.npz --label "..."   # CPU: shortened schedule
    python -m resnet_repro.reproduce --profile paper --launcher slurm hydra.launcher.partition=gpu
    python -m resnet_repro.reproduce --profile quick --dry-run            # print the commands only

Steps: `python -m resnet_repro.download` (skipped with --data), then per experiment
`python -m resnet_repro.train -m experiment=X ...`, then `python -m resnet_repro.plot RUN_DIRS --out
results/<data slug>/<profile>`. Rerunning the same command skips finished runs and resumes interrupted ones. A failed
experiment is reported and the others still run; the exit status is 1 when anything failed. The plot step draws
exactly this invocation's runs (from each sweep's sweep_summary.json), each configuration once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro.errors import ConfigError
from resnet_repro.gpu_slots import runs_per_gpu
from resnet_repro.results import unique_runs
from resnet_repro.run_dir import FAILED_NAME, METRICS_NAME, PLAN_JSON, SUMMARY_JSON, data_dir_name

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Experiment:
    """One multirun of a profile: an experiment file, and sweep overrides that leave out runs trained elsewhere."""

    name: str
    overrides: tuple[str, ...] = ()


# Every configuration of the paper's experiment files once, longest last (ResNet-1202; launched together, the order is
# reversed). The files not run (fig6_resnet, fig7, fig7_110) and the overrides' left-out values hold only
# configurations table6 or fig6_plain train; the plots draw each configuration from whichever run holds it.
PROFILES: dict[str, tuple[Experiment, ...]] = {
    "paper": (
        Experiment("fig6_plain"),
        Experiment("table6"),
        Experiment("shortcuts", ("model.shortcut=B,C",)),
        Experiment("fig6_deep", ("model.depth=1202",)),
    ),
    "quick": (Experiment("quick"),),
    # Figure 6's plain and ResNet nets on a CPU workstation, in two halves of about equal time (fig6_cpu.yaml)
    "cpu": (Experiment("fig6_cpu", ("model.arch=plain",)), Experiment("fig6_cpu", ("model.arch=resnet",))),
}
# Figure/table title suffix per profile; the title already names the data and the iteration count.
TITLE_SUFFIX = {
    "paper": "",
    "quick": " — quick profile: shortened, lr {lr}",
    "cpu": " — CPU profile: the paper's schedule shortened (lr 0.1, ÷10 at 50% and 75%)",
}
LAUNCHERS = ("basic", "local", "slurm", "submitit_local")
# The device a profile's runs must train on unless the command line names one (no weeks of paper runs on a CPU).
PROFILE_DEVICE = {"paper": "cuda", "cpu": "cpu", "quick": "cpu"}
# Launchers whose sweeps run several jobs at once: the experiments are launched together, so no GPU idles while one
# experiment waits for its longest run; each one's output goes to runs/<data>/<experiment>/reproduce.log.
CONCURRENT_LAUNCHERS = ("local", "slurm")
REPRODUCE_LOG = "reproduce.log"
LAUNCH_STAGGER_S = 20.0  # between concurrent launches, longest experiment first: its runs take the slots first
EXIT_STOPPED = 3  # SIGTERM/SIGINT/SIGHUP: passed on to the running sweeps, which checkpoint; rerun to resume


@dataclass
class Step:
    """One command of the reproduction and what became of it."""

    name: str
    cmd: list[str]
    experiment: str | None = None
    status: str = "pending"  # pending | ok | failed
    rc: int | None = None
    wall_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    run_dirs: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # the sweep summary's rows
    note: str = ""


class Stopped(Exception):
    """A stop signal reached reproduce; it was passed on to the running commands, which checkpoint and exit."""


def hydra_quote(value: str) -> str:
    """A Hydra override value that stays one string whatever it contains (commas, spaces, parentheses, quotes)."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_file(experiment: str) -> DictConfig:
    """An experiment file as written (its own keys, not composed with the defaults)."""
    return OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")


def train_command(experiment: Experiment, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "resnet_repro.train", "-m", f"experiment={experiment.name}", *experiment.overrides]
    cmd.append(f"runs_dir={args.runs_dir}")
    if args.data:
        cmd += ["data=npz", f"data.path={Path(args.data).resolve()}"]
    else:
        cmd += [f"data.root={Path(args.data_root).resolve()}"]
    if args.label:
        cmd.append(f"data.label={hydra_quote(args.label)}")
    if args.launcher:
        cmd.append(f"hydra/launcher={args.launcher}")
    return cmd + device_overrides(args) + list(args.overrides)


def device_overrides(args: argparse.Namespace) -> list[str]:
    """The profile's device (`trainer.device=cuda` for the paper profile) and, for the CPU profiles (cpu, quick), the
    fastest settings measured on a CPU (device.cpu_speed_overrides), unless the command line sets those keys itself."""
    given = {o.lstrip("+").split("=", 1)[0] for o in args.overrides}
    wanted = [f"trainer.device={PROFILE_DEVICE[args.profile]}"] if args.profile in PROFILE_DEVICE else []
    if PROFILE_DEVICE.get(args.profile) == "cpu":
        from resnet_repro import device  # imports torch, so only for these profiles

        wanted += device.cpu_speed_overrides()
    return [o for o in wanted if o.split("=", 1)[0] not in given]


def missing_gpu(args: argparse.Namespace) -> str | None:
    """Why the profile cannot start here (its runs need CUDA, and the trainer's device check finds none), or None."""
    if device_overrides(args) != ["trainer.device=cuda"] or args.launcher == "slurm":  # Slurm jobs check their own
        return None
    from resnet_repro.config import Device
    from resnet_repro.device import device_type  # imports torch, so only when the profile needs a GPU

    try:
        device_type(Device.cuda)
    except ConfigError as exc:
        return (
            f"--profile {args.profile} trains 64,000-iteration runs on CUDA (trainer.device=cuda); nothing was run. "
            f"{str(exc).rstrip('.')}. --profile quick is the shortened CPU version."
        )
    return None


def data_dir(args: argparse.Namespace, root: str) -> Path:
    """runs/<data> or results/<data>: the data's directory name is the same under both."""
    return Path(root) / data_dir_name("npz" if args.data else "cifar10", args.data, args.label)


def sweep_dir(args: argparse.Namespace, experiment: str) -> Path:
    return data_dir(args, args.runs_dir) / experiment_file(experiment).get("experiment", experiment)


def plot_command(args: argparse.Namespace, run_dirs: Sequence[str]) -> list[str]:
    suffix = TITLE_SUFFIX[args.profile].format(lr=experiment_file("quick").optim.lr)
    out = ["--out", str(data_dir(args, args.results_dir) / args.profile)]
    return [sys.executable, "-m", "resnet_repro.plot", *run_dirs, *out, *(["--title-suffix", suffix] if suffix else [])]


def collect_results(step: Step, sweep_dir: Path, pid: int) -> None:
    """Fill `step` from the summary of its multirun (process `pid`: an earlier sweep's files do not count); without
    one (the launcher died before the sweep's end), take the planned runs that hold results, so they are still drawn."""

    def read(name: str) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            content = json.loads((sweep_dir / name).read_text())
            return content if content.get("pid") == pid else None
        return None

    if (summary := read(SUMMARY_JSON)) is not None:
        step.counts = summary["counts"]
        step.run_dirs = [r["dir"] for r in summary["runs"] if r["status"] in ("finished", "skipped", "failed")]
        keys = ("name", "status", "test_err", "train_err", "wall_s", "error")
        step.runs = [{k: r.get(k) for k in keys} for r in summary["runs"]]
        return
    step.status, plan = "failed", read(PLAN_JSON)
    if plan is None:
        step.note = "no sweep summary or plan (the multirun stopped before planning its runs)"
        return
    planned = [Path(r["dir"]) for r in plan["runs"]]
    step.run_dirs = [str(d) for d in planned if (d / METRICS_NAME).is_file() or (d / FAILED_NAME).is_file()]
    step.note = (
        f"no sweep summary (the multirun stopped before its end); {len(step.run_dirs)} of its {len(planned)} "
        "planned runs have results and are drawn"
    )


def start(step: Step, log: Path | None) -> subprocess.Popen:
    """Announce `step`, start its command in a session of its own (one killpg reaches its workers too), its output
    on the console (log None) or appended to `log`."""
    print(f"\n=== {step.name}: {shlex.join(step.cmd)}" + (f"\n    output: {log}" if log else ""), flush=True)
    if log is None:
        return subprocess.Popen(step.cmd, start_new_session=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.Popen(step.cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def run_steps(steps: Sequence[Step], logs: Sequence[Path | None], stagger_s: float = 0.0) -> list[int]:
    """Start the commands, each `stagger_s` after the previous one; wait for all; return their process ids.

    SIGTERM, SIGINT or SIGHUP reaching reproduce is passed on as SIGTERM to every command's process group, so every
    local training process, the launchers' workers included, checkpoints and exits (Slurm jobs run on: `scancel`);
    then Stopped is raised."""
    procs: list[subprocess.Popen] = []
    got: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would raise from here on
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
        got.append(signum)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # the command and all its workers are gone
                os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    started = time.perf_counter()
    try:
        for i, (step, log) in enumerate(zip(steps, logs, strict=True)):
            while not got and time.perf_counter() < started + i * stagger_s:
                time.sleep(0.1)  # short sleeps: a stop signal ends the stagger at once
            if got:
                break
            procs.append(start(step, log))
            if got:  # the signal came while this command was starting, before `forward` could see it
                os.killpg(procs[-1].pid, signal.SIGTERM)
        wait_for(steps, procs, started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        names = ", ".join(s.name for s in steps[: len(procs)])
        raise Stopped(f"{names} stopped by {signal.Signals(got[0]).name}; rerun the same command to resume")
    return [proc.pid for proc in procs]


def wait_for(steps: Sequence[Step], procs: Sequence[subprocess.Popen], started: float) -> None:
    """Poll until every command has exited, recording how it ended (printed as it comes when several run)."""
    running = dict(zip(procs, steps))
    while running:
        time.sleep(0.05)
        for proc in [p for p in running if p.poll() is not None]:
            step = running.pop(proc)
            step.rc, step.wall_s = proc.returncode, round(time.perf_counter() - started, 1)
            step.status = "ok" if step.rc == 0 else "failed"
            if len(steps) > 1:
                print(f"=== {step.name}: exit {step.rc} after {step.wall_s:.0f} s", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resnet_repro.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="paper",
        help="paper: every paper experiment (GPU); cpu: Figure 6 on the full data, shortened for a CPU workstation; "
        "quick: the shortened comparison on the sample, in minutes",
    )
    parser.add_argument("--data", help="an npz file (x_train, y_train, x_test, y_test) instead of downloading CIFAR-10")
    parser.add_argument("--label", help="data label shown in figures and tables, also names results/<slug>/")
    parser.add_argument(
        "--launcher", choices=LAUNCHERS, help="Hydra launcher (local: joblib, on all GPUs); default: one at a time"
    )
    parser.add_argument("--runs-dir", default="runs", help="root of the run directories (default runs)")
    parser.add_argument("--results-dir", default="results", help="root of the figures and tables (default results)")
    parser.add_argument("--data-root", default="./data", help="CIFAR-10 download directory (default ./data)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="with --launcher local or slurm: run the experiments one after another, output on the console "
        "(default: all at once, each experiment's output in runs/<data>/<experiment>/reproduce.log)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every train command: trainer.threads=1 ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the profile's steps; print a summary; exit 1 if any step failed, 2 if the data could not be had or the
    profile's GPU is missing, 3 if stopped by a signal."""
    args = parse_args(argv)
    steps = [Step(f"experiment {e.name}", train_command(e, args), experiment=e.name) for e in PROFILES[args.profile]]
    if not args.data:
        steps.insert(0, Step("download", [sys.executable, "-m", "resnet_repro.download", "--root", args.data_root]))
    if args.dry_run:  # the plot's command with a placeholder for the run directories it would get
        print("\n".join(shlex.join(s.cmd) for s in steps))
        print(shlex.join(plot_command(args, ["<run dirs of the sweeps above>"])))
        summaries = dict.fromkeys(f"{sweep_dir(args, s.experiment)}/{SUMMARY_JSON}" for s in steps if s.experiment)
        print(f"# <run dirs of the sweeps above>: from {', '.join(summaries)}, one per configuration")
        return 0
    problem = missing_gpu(args)
    if problem:
        print(f"reproduce: {problem}", file=sys.stderr)
        return 2
    try:
        return run_all(args, steps, argv)
    except Stopped as exc:
        print(f"\nreproduce: {exc}", file=sys.stderr)
        return EXIT_STOPPED


def run_all(args: argparse.Namespace, steps: list[Step], argv: Sequence[str] | None) -> int:
    started = time.time()
    for i, step in enumerate(steps):
        step.name = f"[{i + 1}/{len(steps) + 1}] {step.name}"
    if steps[0].experiment is None:  # the download
        run_steps(steps[:1], [None])
        if steps[0].rc != 0:
            why = f"the download failed (exit {steps[0].rc}); nothing else was run"
            print(f"\nreproduce: {why}. Check the network, or pass --data FILE.npz.", file=sys.stderr)
            return 2
    if args.launcher == "local":
        runs_per_gpu()  # a bad $RESNET_REPRO_RUNS_PER_GPU stops here with one ConfigError, before any launcher
    run_experiments(args, [s for s in steps if s.experiment])
    run_dirs, dropped = unique_runs([d for s in steps for d in s.run_dirs])
    for copy, original in dropped:
        print(f"reproduce: {copy} trains the same configuration as {original}; drawn once", flush=True)
    steps.append(Step(f"[{len(steps) + 1}/{len(steps) + 1}] plot", plot_command(args, [str(d) for d in run_dirs])))
    if run_dirs:
        run_steps(steps[-1:], [None])
    else:
        steps[-1].status, steps[-1].note = "failed", "no run directories to draw"
    report(args, steps, run_dirs, started, argv)
    return 1 if any(s.status != "ok" for s in steps) else 0


def run_experiments(args: argparse.Namespace, experiments: Sequence[Step]) -> None:
    """Run the experiments' multiruns and fill each step from its sweep. With a concurrent launcher they run
    together, each one's output in its sweep's reproduce.log, the longest (last in PROFILES) started first so its
    long runs take GPUs first; otherwise one after another with the output on the console."""
    together = args.launcher in CONCURRENT_LAUNCHERS and not args.sequential and len(experiments) > 1
    for batch in [experiments[::-1]] if together else [[s] for s in experiments]:
        sweep_dirs = [sweep_dir(args, s.experiment) for s in batch]
        logs = [d / REPRODUCE_LOG for d in sweep_dirs] if together else [None]
        pids = run_steps(batch, logs, LAUNCH_STAGGER_S if together else 0.0)
        for step, pid, directory in zip(batch, pids, sweep_dirs, strict=True):
            collect_results(step, directory, pid)


def report(
    args: argparse.Namespace, steps: list[Step], drawn: list[Path], started: float, argv: Sequence[str] | None
) -> None:
    """Print the summary; write results/<data>/<profile>/reproduce.json: command, inputs, steps and runs drawn."""
    out, wall_s = data_dir(args, args.results_dir) / args.profile, round(time.time() - started, 1)
    ok = sum(s.status == "ok" for s in steps)
    print(
        f"\n=== reproduce --profile {args.profile}: {ok} of {len(steps)} steps ok in {wall_s:.0f} s; results in {out}"
    )
    for s in steps:
        counts = ", ".join(f"{n} {k}" for k, n in s.counts.items() if n)
        print(f"  {s.status:<7} {s.name}  {s.wall_s or 0:.0f} s  {counts}  {s.note}".rstrip())
    rows = [{k: v for k, v in vars(s).items() if k not in ("cmd", "run_dirs")} for s in steps]
    record = {
        "command": shlex.join(["python", "-m", "resnet_repro.reproduce", *(sys.argv[1:] if argv is None else argv)]),
        "profile": args.profile,
        "data": args.data or f"CIFAR-10 (torchvision download into {args.data_root})",
        "label": args.label,
        "launcher": args.launcher or "basic",
        "wall_s": wall_s,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": [{**row, "cmd": shlex.join(["python", *s.cmd[1:]])} for row, s in zip(rows, steps)],
        "runs_drawn": [str(d) for d in drawn],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
