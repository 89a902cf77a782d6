"""One training process per run directory (resnet_repro/run_dir.py): a second one is refused before it touches
anything (not even Hydra's .hydra/ or train.log), a sweep reports who holds the directory, and a killed holder
frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    cli_command,
    cli_env,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    run_cli,
)

from resnet_repro.run_dir import RunDirectoryBusy, hold_run_directory, holder
from resnet_repro.sweep import PlannedRun, run_status

HOLD = "import sys; from pathlib import Path; from resnet_repro.run_dir import hold_run_directory as h; " \
       "lock = h(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"  # fmt: skip


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A process holding run_dir's lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_the_first_ones_name_until_it_ends(tmp_path: Path) -> None:
    other = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"being trained by pid {other.pid} on "):
            hold_run_directory(tmp_path)
        assert holder(tmp_path).startswith(f"pid {other.pid} on ")
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    assert holder(tmp_path) is None
    mine = hold_run_directory(tmp_path)
    assert holder(tmp_path).startswith(f"pid {os.getpid()} on ")  # another open file description sees it taken
    mine()
    mine()  # idempotent
    assert holder(tmp_path) is None


def test_kill9_of_the_holder_frees_the_directory(tmp_path: Path) -> None:
    other = hold_in_another_process(tmp_path)
    os.kill(other.pid, signal.SIGKILL)
    other.wait(timeout=30)
    hold_run_directory(tmp_path)()  # no stale lock: the kernel released it with the process


def test_the_command_line_refuses_a_run_directory_in_use_and_leaves_it_alone(sample_npz: Path, tmp_path: Path):
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz")
    run_dir = tmp_path / "run"
    other = hold_in_another_process(run_dir)
    try:
        args = [*data_overrides(npz), "data.batch_size=8", "optim.max_iter=4", "optim.milestones=[2,3]",
                f"hydra.run.dir={run_dir}"]
        started = time.monotonic()
        proc = run_cli(args)
        assert proc.returncode == 5, proc.stdout[-2000:]
        assert f"being trained by pid {other.pid}" in proc.stdout
        assert time.monotonic() - started < 120  # refused at once, not after waiting
        assert sorted(p.name for p in run_dir.iterdir()) == [".train.lock"]  # no .hydra/, train.log, checkpoints
        planned = PlannedRun([], run_dir.name, run_dir)
        row = run_status(planned, {"metrics": False, "failed": None})
        assert row["status"] == "incomplete" and f"being trained by pid {other.pid}" in row["error"]
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    proc = subprocess.run(cli_command(args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # free again: the same command now trains it
    assert (run_dir / "metrics.json").is_file()


def test_the_run_directory_names_import_without_torch() -> None:
    """reproduce and plot read run directories through run_dir.py; importing them must not cost torch's start-up."""
    code = "import sys, resnet_repro.reproduce, resnet_repro.plot; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "False"
