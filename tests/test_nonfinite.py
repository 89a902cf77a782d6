"""NaN/inf in the loss or a gradient (issue 7.5): the bad update is never applied, the run stops naming the
iteration, the last good checkpoint stays, failed.json is written, and in a sweep only that run fails.

Poison is injected after the last BN (on the logits) or into one gradient, so the BN running statistics of the
bad step stay finite; a NaN *input* would also poison those buffers in the forward pass, which no optimizer can
skip: that is one reason the run stops instead of carrying on past a bad step.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    PoisonLogits,
    checkpoint_iteration,
    checkpoint_path,
    compose_config,
    data_overrides,
    in_process_entry,
    make_tiny_npz,
    pinned_threads,
    spawn_ddp,
)

import resnet_repro.train as train_module
from resnet_repro.models import build_model
from resnet_repro.optim import make_sgd
from resnet_repro.run_dir import EXIT_FAILED
from resnet_repro.step import TrainStep
from resnet_repro.sweep import EXIT_SWEEP_FAILED

CPU = torch.device("cpu")


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _setup():
    torch.manual_seed(0)
    model = build_model("resnet", 8, "A", 10)
    optimizer = make_sgd(model, 0.1, 0.9, 1e-4, fused=True)
    return model, optimizer, TrainStep(model, optimizer, "fp32", CPU)


def _params_and_momentum(model, optimizer) -> list[torch.Tensor]:
    params = [p.detach().clone() for p in model.parameters()]
    return params + [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
                     if "momentum_buffer" in optimizer.state[p]]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("poison", ["nan-loss", "inf-gradient"])
def test_a_bad_first_step_changes_no_weight_and_leaves_zero_momentum(poison):
    """Fused SGD skips the update on `found_inf`; on the very first step it would still store momentum buffers
    from `torch.empty_like` (garbage that later steps add in). Zero-initialised buffers make that harmless."""
    model, optimizer, step = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    (x0, y0), (x1, y1) = _batches(2)
    if poison == "nan-loss":
        handle = model.fc.register_forward_hook(PoisonLogits({0}))
    else:
        handle = model.fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    _, _, bad = step(x0, y0)
    handle.remove()
    assert bool(bad)
    assert _same([p.detach() for p in model.parameters()], before)
    assert all(torch.count_nonzero(optimizer.state[p]["momentum_buffer"]) == 0 for p in model.parameters())

    _, _, bad = step(x1, y1)  # the next good step is exactly a fresh run's first step on the same batch
    fresh_model, fresh_optimizer, fresh_step = _setup()
    fresh_step(x1, y1)
    assert not bool(bad)
    assert _same(_params_and_momentum(model, optimizer), _params_and_momentum(fresh_model, fresh_optimizer))


def test_an_fp16_overflow_on_the_first_step_is_skipped_cleanly_and_training_goes_on():
    """With fp16, GradScaler's overflow skip is routine, not an error (the run goes on), and it often hits the very
    first step: before zero-initialised buffers, every later step added uninitialised memory into the momentum."""
    (x0, y0), (x1, y1) = _batches(2)
    model, optimizer, _ = _setup()
    step = TrainStep(model, optimizer, "fp16", CPU)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16 gradients overflow at this scale
    before = [p.detach().clone() for p in model.parameters()]
    _, _, bad = step(x0, y0)
    assert not bool(bad) and step.scaler.get_scale() < 2.0**120  # skipped by the scaler, not a failure
    assert _same([p.detach() for p in model.parameters()], before)
    assert all(torch.count_nonzero(optimizer.state[p]["momentum_buffer"]) == 0 for p in model.parameters())
    step.scaler.update(1024.0)
    step(x1, y1)
    fresh_model, fresh_optimizer, _ = _setup()
    fresh_step = TrainStep(fresh_model, fresh_optimizer, "fp16", CPU)
    fresh_step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fresh_step(x1, y1)
    assert _same(_params_and_momentum(model, optimizer), _params_and_momentum(fresh_model, fresh_optimizer))


@pytest.mark.parametrize("poison", ["nan-loss", "inf-gradient"])
def test_a_bad_step_mid_run_changes_neither_weights_nor_momentum(poison):
    model, optimizer, step = _setup()
    batches = _batches(4)
    for x, y in batches[:3]:
        step(x, y)
    before = _params_and_momentum(model, optimizer)
    if poison == "nan-loss":
        handle = model.fc.register_forward_hook(PoisonLogits({0}))
    else:
        handle = model.conv1.weight.register_hook(lambda g: g * float("inf"))  # loss stays finite
    _, _, bad = step(*batches[3])
    handle.remove()
    assert bool(bad) and _same(_params_and_momentum(model, optimizer), before)


@pytest.fixture
def isolated_logging():
    with in_process_entry():
        yield


@pytest.fixture
def npz(sample_npz, tmp_path):
    return make_tiny_npz(sample_npz, tmp_path / "tiny.npz")


BASE = ["data.batch_size=8", "model.depth=8", "optim.max_iter=16", "optim.milestones=[12]", "trainer.log_every=4",
        "trainer.eval_every=100", "trainer.checkpoint_every=4"]


def test_nan_stops_the_run_naming_the_iteration_keeps_the_checkpoint_and_writes_failed_json(
        npz, tmp_path, monkeypatch, capsys, isolated_logging):
    """Through the real entry point (in-process): NaN logits at iteration 6 of 16."""
    snapshots: list[list[torch.Tensor]] = []  # parameters after each optimizer.step() (skipped or not)

    def poisoned_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.fc.register_forward_hook(PoisonLogits({6}))
        return model

    def spied_sgd(model, *args, **kwargs):
        optimizer = make_sgd(model, *args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: snapshots.append([p.detach().clone() for p in model.parameters()]))
        return optimizer

    monkeypatch.setattr(train_module, "build_model", poisoned_model)
    monkeypatch.setattr(train_module, "make_sgd", spied_sgd)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["resnet_repro.train", *data_overrides(npz), *BASE, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as info:
        train_module.cli()
    out = "".join(capsys.readouterr())
    assert info.value.code == EXIT_FAILED
    assert "non-finite loss or gradient at iteration 6" in out and "Traceback" not in out
    assert _same(snapshots[6], snapshots[5])  # the bad update was not applied
    assert not _same(snapshots[7], snapshots[6])  # (the good ones were)
    assert len(snapshots) == 8  # stopped at the next check (iteration 8), before its checkpoint
    failure = json.loads((run_dir / "failed.json").read_text())
    assert failure["status"] == "failed" and "NonFiniteError" in failure["error"] and "iteration 6" in failure["error"]
    assert not (run_dir / "metrics.json").exists()
    assert checkpoint_iteration(run_dir) == 4  # the last good checkpoint is kept
    state = torch.load(checkpoint_path(run_dir), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_diverging_run_in_a_sweep_is_marked_failed_and_the_others_finish(npz, tmp_path, monkeypatch, capsys,
                                                                           isolated_logging):
    """A real divergence (lr 1e5 overflows to inf/NaN within a few iterations) next to a healthy run."""
    runs = tmp_path / "runs"
    argv = ["-m", "optim.lr=1e5,0.1", *data_overrides(npz), *BASE, f"runs_dir={runs}"]
    monkeypatch.setattr(sys, "argv", ["resnet_repro.train", *argv])
    with pytest.raises(SystemExit) as info:
        train_module.cli()  # every run is attempted; the sweep's exit status then reports the failure
    assert info.value.code == EXIT_SWEEP_FAILED
    diverged = next(runs.glob("*/default/*optim.lr=100000.0*"))
    healthy = next(runs.glob("*/default/*optim.lr=0.1*"))
    failure = json.loads((diverged / "failed.json").read_text())
    assert "non-finite loss or gradient at iteration" in failure["error"]
    first_bad = int(failure["error"].split("at iteration ")[1].split(";")[0])
    assert not (diverged / "metrics.json").exists()
    if checkpoint_path(diverged).exists():
        assert checkpoint_iteration(diverged) <= first_bad  # written before the bad step, never after
    assert json.loads((healthy / "metrics.json").read_text())["status"] == "finished"
    assert not (healthy / "failed.json").exists()



def test_under_ddp_all_ranks_stop_together_on_a_nan_or_a_signal_on_one_rank(npz, tmp_path):
    """2 gloo processes, two runs. (1) NaN logits on rank 1 only at iteration 3: DDP's gradient all-reduce spreads
    them, both ranks skip the update and stop at the next check naming iteration 3 and their rank. (2) SIGTERM to
    rank 1 only before iteration 5: the checkpoint has a barrier, so the ranks agree on the stop (the flag is
    all-reduced at log intervals) and both stop after iteration 8 with one checkpoint. No rank hangs either time."""
    base = [*data_overrides(npz), *BASE]
    nan_run, signal_run = tmp_path / "nan", tmp_path / "signal"
    jobs = [
        {"cfg": compose_config([*base, "trainer.checkpoint_every=2"]), "run_dir": str(nan_run), "nan_on": (1, 3)},
        {"cfg": compose_config([*base, "trainer.checkpoint_every=100"]), "run_dir": str(signal_run),
         "fault_on": (1, "step@5/term")},
    ]
    nan_outcomes, signal_outcomes = spawn_ddp(jobs)
    for rank, outcome in enumerate(nan_outcomes):
        assert f"non-finite loss or gradient at iteration 3 (rank {rank} of 2)" in outcome, outcome
    assert checkpoint_iteration(nan_run) == 2  # rank 0's last good checkpoint; nothing written after the bad step
    assert "SIGTERM received" in signal_outcomes[1] and "stop (another rank) received" in signal_outcomes[0]
    assert all("checkpoint written at iteration 8" in o for o in signal_outcomes), signal_outcomes
    assert checkpoint_iteration(signal_run) == 8
