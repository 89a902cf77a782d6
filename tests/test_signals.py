"""SIGTERM / SIGUSR1 (Slurm preemption, issue 7.6): a checkpoint at the next step boundary, a non-zero exit that
says to rerun, and a rerun that ends bit-identical to the uninterrupted canonical run (tests/reliability_support)."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
from conftest import REPO
from reliability_support import (
    after_the_last_event_file,
    checkpoint_iteration,
    checkpoint_path,
    cli_command,
    cli_env,
    curves,
    data_overrides,
    make_tiny_npz,
    reference_run,
    run_forked,
    train_in_process,
)

import resnet_repro.train as train_module
from resnet_repro import faults
from resnet_repro.checkpoint import state_digest
from resnet_repro.engine import Preempted


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_npz):
    return reference_run(tmp_path_factory, sample_npz)


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
    assert proc.returncode == train_module.EXIT_PREEMPTED, out[-3000:]
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

    assert run_forked(launch) == train_module.EXIT_PREEMPTED
    seed0 = next(runs.glob("default/*seed=0*"))
    assert checkpoint_iteration(seed0) == 6 and not (seed0 / "failed.json").exists()
    assert not list(runs.glob("default/*seed=1*"))


def _ddp_worker(rank: int, world_size: int, port: int, cfg, run_dir: str) -> None:
    """One gloo rank; only rank 1 gets SIGTERM (before iteration 5). Writes what happened to rank<r>.txt."""
    import os
    from pathlib import Path

    import torch

    from resnet_repro.engine import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with faults.inject("step@5/term" if rank == 1 else None):
            train_module.train(cfg, Path(run_dir), DistInfo(rank=rank, world_size=world_size))
        outcome = "finished"
    except Preempted as exc:
        outcome = str(exc)
    finally:
        torch.distributed.destroy_process_group()
    (Path(run_dir).parent / f"rank{rank}.txt").write_text(outcome)


def test_under_ddp_a_signal_to_one_rank_stops_all_ranks_at_the_same_boundary(sample_npz, tmp_path):
    """The checkpoint has a barrier, so ranks must agree when to stop: the flag is all-reduced at log intervals."""
    import socket
    import time

    import torch.multiprocessing as mp
    from reliability_support import compose_config

    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = compose_config([*data_overrides(npz), "data.batch_size=8", "model.depth=8", "optim.max_iter=16",
                          "optim.milestones=[12]", "trainer.log_every=4", "trainer.eval_every=100",
                          "trainer.checkpoint_every=100"])
    run_dir = tmp_path / "run"
    context = mp.spawn(_ddp_worker, args=(2, port, cfg, str(run_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a DDP rank hung after SIGTERM")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "SIGTERM received" in outcomes[1] and "stop (another rank) received" in outcomes[0], outcomes
    assert all("checkpoint written at iteration 8" in o for o in outcomes), outcomes
    assert checkpoint_iteration(run_dir) == 8
