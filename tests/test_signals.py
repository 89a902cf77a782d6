"""SIGTERM / SIGUSR1 (Slurm preemption, issue 7.6): a checkpoint at the next step boundary, a non-zero exit that
says to rerun, and a rerun that ends bit-identical to the uninterrupted canonical run (tests/reliability_support).
Under DDP (a signal to one rank only): tests/test_nonfinite.py, which spawns the two gloo ranks once for both."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys

import fault_injection.sitecustomize as faults
import pytest
from conftest import REPO
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    after_the_last_event_file,
    checkpoint_iteration,
    checkpoint_path,
    cli_command,
    cli_env,
    curves,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    run_forked,
    state_digest,
    train_in_process,
)

import resnet_repro.train as train_module
from resnet_repro.engine import NotRequeued
from resnet_repro.run_dir import EXIT_PREEMPTED, Preempted


def test_sigusr1_checkpoints_at_the_next_step_boundary_and_the_rerun_is_bit_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    with faults.inject("step@23/usr1"), pytest.raises(Preempted) as info:  # arrives just before iteration 23
        train_in_process(copy.deepcopy(reference["cfg"]), run_dir)
    message = str(info.value)
    assert "SIGUSR1" in message and "iteration 24" in message and "rerun the same command" in message
    assert checkpoint_iteration(run_dir) == 24  # not a checkpoint_every multiple: written because of the signal
    assert not (run_dir / "metrics.json").exists()
    after_the_last_event_file(run_dir)
    train_in_process(copy.deepcopy(reference["cfg"]), run_dir)
    assert state_digest(checkpoint_path(run_dir)) == reference["digest"]
    assert curves(run_dir) == curves(reference["run_dir"])  # incl. the log point at 25, half before the signal


def test_sigterm_from_outside_through_the_command_line_then_rerun_is_bit_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli_command([*reference["overrides"], f"hydra.run.dir={run_dir}"]), cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # log lines are flushed one by one; wait until training is under way
            seen.append(line)
            if "iter 15/60" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "SIGTERM received" in out and "rerun the same command to resume" in out and "Traceback" not in out
    stopped_at = checkpoint_iteration(run_dir)
    assert 15 <= stopped_at < 60 and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "failed.json").exists()  # preemption is not a failure
    after_the_last_event_file(run_dir)
    train_in_process(copy.deepcopy(reference["cfg"]), run_dir)  # the rerun
    assert state_digest(checkpoint_path(run_dir)) == reference["digest"]
    assert curves(run_dir) == curves(reference["run_dir"])


def test_sigterm_stops_a_whole_basic_launcher_sweep_not_just_its_current_run(sample_npz, tmp_path):
    """The signal is for the process: the next run of the sweep must not start (Slurm would kill it anyway)."""
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz")
    runs = tmp_path / "runs"
    argv = ["-m", "seed=0,1", *data_overrides(npz), "data.batch_size=8", "model.depth=8", "optim.max_iter=12",
            "optim.milestones=[8]", "trainer.log_every=4", "trainer.eval_every=100", "trainer.checkpoint_every=4",
            f"runs_dir={runs}"]

    def launch():
        sys.argv = ["resnet_repro.train", *argv]
        with faults.inject("step@5/term"):
            train_module.cli()

    assert run_forked(launch) == EXIT_PREEMPTED
    seed0 = next(runs.glob("*/default/*seed=0*"))
    assert checkpoint_iteration(seed0) == 6 and not (seed0 / "failed.json").exists()
    assert not list(runs.glob("*/default/*seed=1*"))


@pytest.mark.parametrize("requeued", [True, False], ids=["requeued", "out of requeues"])
def test_sigusr2_checkpoints_then_hands_the_signal_to_submitits_handler(reference, tmp_path, requeued):
    """hydra-submitit-launcher's jobs get SIGUSR2 before their time limit, and submitit's handler requeues the job
    and exits. Ours comes first: the checkpoint at the next step boundary, then submitit's handler (here a stand-in
    that records what it finds on disk), so the requeued job loses no iteration."""
    run_dir = tmp_path / "run"
    seen = []

    def submitit_handler(signum, frame):
        seen.append((signum, checkpoint_iteration(run_dir)))
        if not requeued:  # what submitit raises after max_num_timeout requeues
            raise RuntimeError("Job not requeued because: timed-out too many times.")

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        # not requeued: an ordinary failure (submitit then records the job's result; the sweep lists it as failed
        # and its rerun resumes from the checkpoint), never a bare exit
        error, expected = (Preempted, "SIGUSR2") if requeued else (NotRequeued, "SIGUSR2 .* not requeued: Job not")
        with faults.inject("step@23/usr2"), pytest.raises(error, match=expected):
            train_in_process(copy.deepcopy(reference["cfg"]), run_dir)
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # ours is removed again after the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, 24)]  # called once, after the checkpoint of iteration 24 was written
    train_in_process(copy.deepcopy(reference["cfg"]), run_dir)  # the requeued job
    assert state_digest(checkpoint_path(run_dir)) == reference["digest"]
