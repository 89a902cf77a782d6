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
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro.errors import ConfigError
from resnet_repro.gpu_slots import runs_per_gpu
from resnet_repro.results import unique_runs
from resnet_repro.run_files import FAILED_NAME, METRICS_NAME, PLAN_JSON, SUMMARY_JSON, data_dir_name

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
PROFILE_DEVICE = {"paper": "cuda", "cpu": "cpu"}
# Launchers whose sweeps run several jobs at once: the experiments are launched together, so no GPU idles while one
# experiment waits for its longest run; each one's output goes to runs/<data>/<experiment>/reproduce.log.
CONCURRENT_LAUNCHERS = ("local", "slurm")
REPRODUCE_LOG = "reproduce.log"
LAUNCH_STAGGER_S = 20.0  # between concurrent launches, longest experiment first: its runs take the slots first
EXIT_STOPPED = 3  # SIGTERM/SIGINT: passed on to the running sweep, which checkpoints; rerun to resume (as train.py)


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
    """The multirun command of one experiment."""
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
    """The profile's device (`trainer.device=cuda` for the paper profile) and, for the CPU profile, the fastest
    settings measured on a CPU (device.cpu_speed_overrides), unless the command line sets those keys itself."""
    given = {o.lstrip("+").split("=", 1)[0] for o in args.overrides}
    wanted = []
    if args.profile in PROFILE_DEVICE:
        wanted.append(f"trainer.device={PROFILE_DEVICE[args.profile]}")
    if args.profile == "cpu":
        from resnet_repro import device  # imports torch, so only for this profile

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


def results_dir(args: argparse.Namespace) -> Path:
    """results/<slug of the data label>/<profile>."""
    return Path(args.results_dir) / data_slug(args) / args.profile


def data_slug(args: argparse.Namespace) -> str:
    """The data's directory name, under runs/ as under results/."""
    return data_dir_name("npz" if args.data else "cifar10", args.data, args.label)


def read_sweep_file(path: Path, pid: int) -> dict[str, Any] | None:
    """A sweep summary or plan written by the multirun with this process id, or None."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if content.get("pid") == pid else None


def collect_results(step: Step, sweep_dir: Path, pid: int) -> None:
    """Fill `step` from its sweep's summary; without one (the launcher died before the sweep's end), take the
    planned run directories that hold results, so finished runs are still drawn."""
    summary = read_sweep_file(sweep_dir / SUMMARY_JSON, pid)
    if summary is not None:
        step.counts = summary["counts"]
        step.run_dirs = [r["dir"] for r in summary["runs"] if r["status"] in ("finished", "skipped", "failed")]
        step.runs = [
            {k: r.get(k) for k in ("name", "status", "test_err", "train_err", "wall_s", "error")}
            for r in summary["runs"]
        ]
        return
    step.status = "failed"
    plan = read_sweep_file(sweep_dir / PLAN_JSON, pid)
    if plan is None:
        step.note = "no sweep summary or plan (the multirun stopped before planning its runs)"
        return
    planned = [Path(r["dir"]) for r in plan["runs"]]
    step.run_dirs = [str(d) for d in planned if (d / METRICS_NAME).is_file() or (d / FAILED_NAME).is_file()]
    step.note = (
        f"no sweep summary (the multirun stopped before its end); {len(step.run_dirs)} of its {len(planned)} "
        "planned runs have results and are drawn"
    )


def display(cmd: Sequence[str]) -> str:
    """A command as one copy-pasteable line, with `python` for the interpreter."""
    return shlex.join(["python", *cmd[1:]])


class Stopped(Exception):
    """SIGTERM or SIGINT reached reproduce; it was passed on to the running command, which checkpoints and exits."""


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`'s process group: the command and every worker it started, if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)


@dataclass
class Launches:
    """The commands started so far, and the stop signals received while they run (passed on to all of them)."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)  # wakes the stagger's wait at once

    @contextlib.contextmanager
    def forwarding_signals(self) -> Iterator[None]:
        """Within the block, SIGTERM, SIGINT and SIGHUP stop every command started instead of reproduce."""
        previous = {sig: signal.signal(sig, self.forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def forward(self, signum: int, frame: Any) -> None:
        """The signal handler: record the signal and SIGTERM every command's process group."""
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would raise from here on
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
        self.signals.append(signum)
        self.stopping.set()
        for proc in self.procs:
            stop_group(proc)

    def start(self, step: Step, log_path: Path | None) -> None:
        """Announce `step` and start its command in a new process group, its output on the console (log_path None)
        or appended to log_path; stopped at once if a signal came while it was starting."""
        where = f"\n    output: {log_path}" if log_path else ""
        print(f"\n=== {step.name}: {shlex.join(step.cmd)}{where}", flush=True)
        if log_path is None:
            proc = subprocess.Popen(step.cmd, start_new_session=True)
        else:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                proc = subprocess.Popen(step.cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        if self.signals:  # the signal came before `forward` could see this command
            stop_group(self.procs[-1])


def wait_for_all(steps: Sequence[Step], procs: Sequence[subprocess.Popen], started: float) -> None:
    """Poll until every started command has exited; record each one's exit code, status and wall time, and with
    several steps print each one's end as it comes."""
    several = len(steps) > 1
    running = list(zip(steps, procs))
    while running:
        for step, proc in running:
            if proc.poll() is not None:
                step.rc, step.wall_s = proc.returncode, round(time.perf_counter() - started, 1)
                step.status = "ok" if step.rc == 0 else "failed"
                if several:
                    print(f"=== {step.name}: exit {step.rc} after {step.wall_s:.0f} s", flush=True)
        running = [(step, proc) for step, proc in running if step.rc is None]
        time.sleep(0.2 if several else 0.05)


def run_steps(steps: Sequence[Step], logs: Sequence[Path | None], stagger_s: float = 0.0) -> list[int]:
    """Run the commands at once, each `stagger_s` after the previous one, with its output on the console (log None)
    or appended to its log file; wait for all; return their process ids.

    SIGTERM, SIGINT or SIGHUP reaching reproduce is passed on as SIGTERM to every command's process group, so every
    local training process, the launchers' workers included, checkpoints and exits (Slurm jobs run on: `scancel`)."""
    launches = Launches()
    started = time.perf_counter()
    with launches.forwarding_signals():
        for i, (step, log_path) in enumerate(zip(steps, logs, strict=True)):
            if i and stagger_s:
                launches.stopping.wait(stagger_s)
            if launches.signals:
                break
            launches.start(step, log_path)
        wait_for_all(steps, launches.procs, started)
    if launches.signals:
        names = ", ".join(s.name for s in steps[: len(launches.procs)])
        signal_name = signal.Signals(launches.signals[0]).name
        raise Stopped(f"{names} stopped by {signal_name}; rerun the same command to resume")
    return [proc.pid for proc in launches.procs]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m resnet_repro.reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Extra arguments are Hydra overrides given to every training command, e.g. trainer.threads=1.",
    )
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
        "--launcher",
        choices=LAUNCHERS,
        help="Hydra launcher: local (all GPUs, joblib), slurm, submitit_local; default: one at a time",
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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training command")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the profile's steps; print a summary; exit 1 if any step failed, 2 if the data could not be had or the
    profile's GPU is missing, 3 if stopped by a signal."""
    args = parse_args(argv)
    steps = [Step(f"experiment {e.name}", train_command(e, args), experiment=e.name) for e in PROFILES[args.profile]]
    if not args.data:
        steps.insert(0, Step("download", [sys.executable, "-m", "resnet_repro.download", "--root", args.data_root]))
    if args.dry_run:
        print_commands(args, steps)
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


def sweep_dir(args: argparse.Namespace, experiment: str) -> Path:
    """Where an experiment's sweep writes its runs and its sweep_summary.json."""
    return Path(args.runs_dir) / data_slug(args) / experiment_file(experiment).get("experiment", experiment)


def plot_command(args: argparse.Namespace, run_dirs: Sequence[str]) -> list[str]:
    """The command that draws `run_dirs` into the profile's results directory."""
    suffix = TITLE_SUFFIX[args.profile].format(lr=experiment_file("quick").optim.lr)
    title = ["--title-suffix", suffix] if suffix else []
    return [sys.executable, "-m", "resnet_repro.plot", *run_dirs, "--out", str(results_dir(args)), *title]


def print_commands(args: argparse.Namespace, steps: Sequence[Step]) -> None:
    """--dry-run: every command, the plot's with a placeholder for the run directories it would get."""
    for step in steps:
        print(shlex.join(step.cmd))
    print(shlex.join(plot_command(args, ["<run dirs of the sweeps above>"])))
    summaries = dict.fromkeys(f"{sweep_dir(args, s.experiment)}/{SUMMARY_JSON}" for s in steps if s.experiment)
    print(f"# <run dirs of the sweeps above>: from {', '.join(summaries)}, one per configuration")


def run_all(args: argparse.Namespace, steps: list[Step], argv: Sequence[str] | None) -> int:
    """Run download, experiments and plot; print the summary and write reproduce.json; return the exit status."""
    started = time.time()
    for i, step in enumerate(steps):
        step.name = f"[{i + 1}/{len(steps) + 1}] {step.name}"
    if not download([s for s in steps if s.experiment is None]):
        return 2
    if args.launcher == "local":
        runs_per_gpu()  # a bad $RESNET_REPRO_RUNS_PER_GPU stops here with one ConfigError, before any launcher
    run_experiments(args, [s for s in steps if s.experiment is not None])
    run_dirs = plot(args, steps)
    print_summary(args, steps, started)
    write_record(args, steps, run_dirs, started, argv)
    return 1 if any(s.status != "ok" for s in steps) else 0


def download(steps: Sequence[Step]) -> bool:
    """Run the download step, if any; False, having said so, when it failed."""
    for step in steps:
        run_steps([step], [None])
        if step.rc != 0:
            print(
                f"\nreproduce: the download failed (exit {step.rc}); nothing else was run. Check the network, "
                "or pass --data FILE.npz.",
                file=sys.stderr,
            )
            return False
    return True


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


def plot(args: argparse.Namespace, steps: list[Step]) -> list[Path]:
    """Draw the runs of every experiment, each configuration once; append the plot step to `steps`; return the run
    directories drawn."""
    run_dirs, dropped = unique_runs([d for s in steps for d in s.run_dirs])
    for copy, original in dropped:
        print(f"reproduce: {copy} trains the same configuration as {original}; drawn once", flush=True)
    step = Step(f"[{len(steps) + 1}/{len(steps) + 1}] plot", plot_command(args, [str(d) for d in run_dirs]))
    if run_dirs:
        run_steps([step], [None])
    else:
        step.status, step.note = "failed", "no run directories to draw"
    steps.append(step)
    return run_dirs


def print_summary(args: argparse.Namespace, steps: Sequence[Step], started: float) -> None:
    """One line for the whole reproduction, then one per step: status, wall time, run counts, note."""
    ok = sum(s.status == "ok" for s in steps)
    print(
        f"\n=== reproduce --profile {args.profile}: {ok} of {len(steps)} steps ok "
        f"in {time.time() - started:.0f} s; results in {results_dir(args)}"
    )
    for s in steps:
        counts = ", ".join(f"{n} {k}" for k, n in s.counts.items() if n)
        print(f"  {s.status:<7} {s.name}  {s.wall_s or 0:.0f} s  {counts}  {s.note}".rstrip())


def write_record(
    args: argparse.Namespace,
    steps: Sequence[Step],
    run_dirs: Sequence[Path],
    started: float,
    argv: Sequence[str] | None,
) -> None:
    """results/<data>/<profile>/reproduce.json: the command, its inputs, every step and the runs drawn."""
    record = {
        "command": shlex.join(["python", "-m", "resnet_repro.reproduce", *(sys.argv[1:] if argv is None else argv)]),
        "profile": args.profile,
        "data": args.data or f"CIFAR-10 (torchvision download into {args.data_root})",
        "label": args.label,
        "launcher": args.launcher or "basic",
        "wall_s": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": [
            {**{k: v for k, v in vars(s).items() if k not in ("run_dirs", "cmd")}, "cmd": display(s.cmd)} for s in steps
        ],
        "runs_drawn": [str(d) for d in run_dirs],
    }
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
