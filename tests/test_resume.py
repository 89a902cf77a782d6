"""Exact resume after kill -9 (issue 7.1) and sweep safety after a killed sweep (issue 7.7).

The canonical run (tests/reliability_support.py): ResNet-20, batch 8 on 120 real CIFAR-10 images, so an epoch
is 15 iterations; 60 iterations; checkpoints every 10; lr milestone at 45; the paper's warm-up (ends near
iteration 20). Its final state digest (model + BN buffers, optimizer, warm-up, RNG, iteration) is compared with
runs killed with SIGKILL and restarted: SIGKILL runs nothing after it (no `finally`, no cleanup), exactly as
a preempted or OOM-killed job.
"""

from __future__ import annotations

import copy
import json
import shutil

import fault_injection.sitecustomize as faults
import pytest
import torch
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    BATCH,
    ITERS_PER_EPOCH,
    N_TRAIN,
    after_the_last_event_file,
    checkpoint_iteration,
    checkpoint_path,
    compose_config,
    curves,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    run_cli,
    run_forked,
    state_digest,
    temp_files,
    train_in_process,
    tree_snapshot,
)

from resnet_repro.optim import Warmup


def test_the_canonical_run_has_the_shape_the_kill_points_assume(reference):
    assert N_TRAIN % BATCH == 0 and ITERS_PER_EPOCH == 15  # epochs start exactly at iterations 15, 30, 45
    assert sorted(reference["snapshots"]) == [10, 20, 30, 40, 50, 60]
    warmup = torch.load(reference["snapshots"][60], weights_only=True)["warmup"]
    assert warmup["active"] is False and 0 < warmup["ended_at"] <= 25  # the warm-up ended mid-run (cap: 25)


def test_kill9_mid_epoch_mid_checkpoint_and_at_epoch_boundary_then_resume_is_bit_exact(reference, tmp_path):
    """Three SIGKILLs in one run directory, each followed by a restart of the same run, end bit-identical."""
    run_dir = tmp_path / "run"
    cli_args = [*reference["overrides"], f"hydra.run.dir={run_dir}"]
    cfg = reference["cfg"]

    def restart_with(fault: str):
        def go():
            after_the_last_event_file(run_dir)
            with faults.inject(fault):
                train_in_process(copy.deepcopy(cfg), run_dir)
        return go

    # 1. Mid-epoch: killed before iteration 17 (epoch 1 runs 15..29); the last checkpoint is 10.
    assert run_forked(restart_with("step@17")) == -9
    assert checkpoint_iteration(run_dir) == 10 and not (run_dir / "metrics.json").exists()

    # 2. While a checkpoint is written, through the real command line: resumes at 10, killed after the data of
    #    checkpoint 40 is written and fsynced but before the rename. last.pt is still the whole checkpoint 30.
    proc = run_cli(cli_args, fault="checkpoint:before_rename@40")
    assert proc.returncode == -9, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "at iteration 10" in proc.stdout
    assert checkpoint_iteration(run_dir) == 30 and 30 % ITERS_PER_EPOCH == 0  # an epoch boundary
    assert len(temp_files(run_dir / "checkpoints")) == 1  # the orphaned, complete-but-unrenamed checkpoint 40

    # 3. Exactly at an epoch boundary: resumes at 30 (epoch 2 starts there), killed before iteration 45 (epoch 3
    #    starts there), so iterations 40..44 are replayed from checkpoint 40 on the next start.
    assert run_forked(restart_with("step@45")) == -9
    assert checkpoint_iteration(run_dir) == 40 and 45 % ITERS_PER_EPOCH == 0
    assert temp_files(run_dir / "checkpoints") == []  # the start cleaned the stale temp file

    # 4. The same run once more, uninterrupted, to the end.
    after_the_last_event_file(run_dir)
    metrics = train_in_process(copy.deepcopy(cfg), run_dir)
    assert metrics["iterations"] == 60 and (run_dir / "metrics.json").exists()
    assert state_digest(checkpoint_path(run_dir)) == reference["digest"]
    assert temp_files(run_dir / "checkpoints") == []
    assert curves(run_dir) == curves(reference["run_dir"])  # Figure-6 curves: no doubled, lost or changed point
    final = json.loads((reference["run_dir"] / "metrics.json").read_text())
    assert (metrics["final_test_err"], metrics["final_train_loss"]) == (final["final_test_err"],
                                                                        final["final_train_loss"])


def test_killed_between_the_final_checkpoint_and_metrics_json(reference, tmp_path):
    """The last checkpoint is in place but metrics.json is not: the rerun trains nothing and writes the same one."""
    run_dir = tmp_path / "run"
    checkpoint_path(run_dir).parent.mkdir(parents=True)
    shutil.copy(reference["snapshots"][60], checkpoint_path(run_dir))
    metrics = train_in_process(copy.deepcopy(reference["cfg"]), run_dir)
    final = json.loads((reference["run_dir"] / "metrics.json").read_text())
    same = ("iterations", "final_test_err", "final_test_loss", "final_train_err", "final_train_loss", "params")
    assert {k: metrics[k] for k in same} == {k: final[k] for k in same}
    assert state_digest(checkpoint_path(run_dir)) == reference["digest"]


@pytest.mark.parametrize(
    "broken",
    [None, "momentum", "warmup", "iteration"],
    ids=["correct-resume", "drops-momentum", "drops-warmup-state", "restarts-data-stream"],
)
def test_resume_negative_controls(reference, tmp_path, monkeypatch, broken):
    """Resuming from the reference's checkpoint 40 reproduces its digest, and each lossy resume does not.

    The controls show the comparison can fail: a resume that drops the momentum buffers, the warm-up state (so
    the warm-up starts again at lr 0.01) or the position in the data stream ends with a different digest.
    """
    run_dir = tmp_path / "run"
    checkpoint_path(run_dir).parent.mkdir(parents=True)
    shutil.copy(reference["snapshots"][40], checkpoint_path(run_dir))
    if broken == "momentum":
        load = torch.optim.Optimizer.load_state_dict
        monkeypatch.setattr(torch.optim.SGD, "load_state_dict", lambda self, sd: load(self, {**sd, "state": {}}))
    elif broken == "warmup":
        monkeypatch.setattr(Warmup, "load_state_dict", lambda self, sd: None)
    elif broken == "iteration":
        import resnet_repro.engine as engine

        train_batch = engine.DeviceData.train_batch
        monkeypatch.setattr(engine.DeviceData, "train_batch", lambda self, it, *a: train_batch(self, it - 40, *a))
    train_in_process(copy.deepcopy(reference["cfg"]), run_dir)
    digest = state_digest(checkpoint_path(run_dir))
    if broken is None:
        assert digest == reference["digest"]
    else:
        assert digest != reference["digest"]


def test_killed_sweep_relaunched_leaves_finished_runs_untouched_and_resumes_the_killed_one(sample_npz, tmp_path):
    """A 3-run sweep (basic launcher) SIGKILLed in its 2nd run, relaunched with the same command.

    Runs differ in optim.max_iter (20, 40, 30), so one fault `step@25` kills only the 2nd run. After the relaunch
    the finished 1st run has the same files with the same bytes and mtimes, the 2nd resumed from its checkpoint
    and ends bit-identical to an uninterrupted run, and the 3rd ran.
    """
    npz = make_tiny_npz(sample_npz, tmp_path / "tiny.npz")
    runs = tmp_path / "runs"
    sweep = [*data_overrides(npz), "data.batch_size=8", "model.depth=8", "optim.milestones=[15]",
             "trainer.log_every=5", "trainer.eval_every=100", "trainer.checkpoint_every=10", f"runs_dir={runs}"]
    argv = ["-m", "optim.max_iter=20,40,30", *sweep]

    def first_launch():
        import sys

        from resnet_repro.train import cli

        sys.argv = ["resnet_repro.train", *argv]
        with faults.inject("step@25"):
            cli()

    assert run_forked(first_launch) == -9
    run_dirs = {it: next(runs.glob(f"*/default/*optim.max_iter={it},*")) for it in (20, 40)}
    assert not list(runs.glob("*/default/*optim.max_iter=30,*"))  # never started
    assert (run_dirs[20] / "metrics.json").exists() and not (run_dirs[40] / "metrics.json").exists()
    assert checkpoint_iteration(run_dirs[40]) == 20
    finished_before = tree_snapshot(run_dirs[20])

    proc = run_cli(argv)  # the same command, now for real
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert tree_snapshot(run_dirs[20]) == finished_before  # same files, same bytes, same mtimes
    assert "resumed from" in proc.stdout and "at iteration 20" in proc.stdout
    run_dirs[30] = next(runs.glob("*/default/*optim.max_iter=30,*"))
    for it, run_dir in run_dirs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["iterations"] == it
        assert not (run_dir / "failed.json").exists() and temp_files(run_dir / "checkpoints") == []

    uninterrupted = tmp_path / "uninterrupted"
    train_in_process(compose_config([*sweep, "optim.max_iter=40"]), uninterrupted)
    assert state_digest(checkpoint_path(run_dirs[40])) == state_digest(checkpoint_path(uninterrupted))
    assert curves(run_dirs[40]) == curves(uninterrupted)


@pytest.mark.parametrize("fixed", [True, False], ids=["layouts matched", "negative control: unmatched"])
def test_resume_with_another_memory_layout_continues_the_same_run(reference, tmp_path, monkeypatch, fixed):
    """A checkpoint written contiguous, resumed with `trainer.channels_last=true` (as a CPU run resumed on a GPU
    would be): the momentum buffers take the parameters' layout, so fused SGD updates the right elements and the
    run ends where the uninterrupted one does, up to the rounding of channels_last convolutions. Resumed at 50
    of 60 (after the milestone): longer, the rounding alone grows past what tells the two cases apart."""
    import resnet_repro.engine as engine

    if not fixed:
        monkeypatch.setattr(engine, "match_parameter_layouts", lambda optimizer: None)
    run_dir = tmp_path / "run"
    checkpoint_path(run_dir).parent.mkdir(parents=True)
    shutil.copy(reference["snapshots"][50], checkpoint_path(run_dir))
    train_in_process(compose_config([*reference["overrides"], "trainer.channels_last=true"]), run_dir)
    ours = torch.load(checkpoint_path(run_dir), weights_only=True)["model"]
    ref = torch.load(checkpoint_path(reference["run_dir"]), weights_only=True)["model"]
    worst = max(
        float((ours[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-12))
        for k in ref
        if ref[k].is_floating_point()
    )
    if fixed:  # measured: 4.3e-5 (matched), 7.3e-3 (unmatched: CPU's fused kernel adds the wrong elements)
        assert worst < 5e-4
    else:
        assert worst > 2e-3
