"""Atomic checkpoints (issue 7.2) and corrupt or foreign checkpoints rejected before training (issue 7.3)."""

from __future__ import annotations

import copy
import errno
import os
import signal

import fault_injection.sitecustomize as faults
import pytest
import torch
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    checkpoint_path,
    compose_config,
    data_overrides,
    make_tiny_npz,
    pinned_threads,
    run_cli,
    run_forked,
    state_digest,
    temp_files,
    train_in_process,
)

from resnet_repro.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from resnet_repro.errors import ConfigError
from resnet_repro.models import build_model

STAGES = ("before_fsync", "before_rename", "after_rename")


# ---------------------------------------------------------------------------------------------------- atomic writes
def _state(iteration: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model("resnet", 8, "A", 10)
    return {"config_fingerprint": "f" * 64, "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "rng": {"cpu": torch.get_rng_state()}, "run_state": {"iteration": iteration}}


@pytest.fixture
def previous(tmp_path):
    """A directory holding a good checkpoint of iteration 10, and the state of the next one (iteration 20)."""
    path = tmp_path / "checkpoints" / "last.pt"
    old, new = _state(10, seed=0), _state(20, seed=1)
    save_checkpoint(path, old)
    return path, old, new


def _loads_as(path, expected: dict) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)  # never a partial file: this must not raise
    load_checkpoint(path, "f" * 64, build_model("resnet", 8, "A", 10))  # and the runner accepts it
    return state_digest(state) == state_digest({"format_version": 1, **expected})


@pytest.mark.parametrize("stage", STAGES)
def test_exception_at_every_stage_keeps_a_loadable_checkpoint_and_no_temp_file(previous, stage):
    path, old, new = previous
    with faults.inject(f"checkpoint:{stage}@20/raise"), pytest.raises(faults.FaultInjected):
        save_checkpoint(path, new)
    # after the rename the new checkpoint is complete and in place; before it, the old one is untouched
    assert _loads_as(path, new if stage == "after_rename" else old)
    assert temp_files(path.parent) == []


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_every_stage_keeps_a_loadable_checkpoint_and_the_next_start_cleans_up(previous, stage):
    path, old, new = previous

    def write():
        with faults.inject(f"checkpoint:{stage}@20"):
            save_checkpoint(path, new)

    assert run_forked(write) == -signal.SIGKILL
    assert _loads_as(path, new if stage == "after_rename" else old)
    left = temp_files(path.parent)
    assert len(left) == (0 if stage == "after_rename" else 1)  # a kill runs no cleanup: the temp file stays
    assert remove_stale_temp_files(path.parent) == len(left) and temp_files(path.parent) == []
    assert _loads_as(path, new if stage == "after_rename" else old)


def test_sigkill_halfway_through_writing_the_data(previous):
    path, old, _ = previous

    def write():
        def half_then_die(f):
            f.write(b"PK\x03\x04" + b"\0" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write_bytes(path, half_then_die)

    assert run_forked(write) == -signal.SIGKILL
    assert _loads_as(path, old) and len(temp_files(path.parent)) == 1


def test_disk_full_halfway_leaves_the_previous_checkpoint_and_no_temp_file(previous):
    path, old, _ = previous

    def half_then_disk_full(f):
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, half_then_disk_full)
    assert _loads_as(path, old) and temp_files(path.parent) == []


def test_published_files_are_readable_by_the_group_like_any_other_file(previous):
    path, _, _ = previous
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# ------------------------------------------------------------------------------------- corrupt / foreign checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sample_npz):
    """A finished 4-iteration ResNet-8 run (its checkpoint is the good one) and its config overrides."""
    root = tmp_path_factory.mktemp("ckpt")
    npz = make_tiny_npz(sample_npz, root / "tiny.npz")
    overrides = [*data_overrides(npz), "data.batch_size=8", "model.depth=8", "optim.max_iter=4",
                 "optim.milestones=[2]", "trainer.log_every=2", "trainer.eval_every=100", "trainer.checkpoint_every=2"]
    train_in_process(compose_config(overrides), root / "good")
    return {"root": root, "overrides": overrides, "good": checkpoint_path(root / "good").read_bytes()}


def _other_run_checkpoint(tiny, name: str, extra: list[str]) -> bytes:
    run_dir = tiny["root"] / name
    if not checkpoint_path(run_dir).exists():
        train_in_process(compose_config([*tiny["overrides"], *extra]), run_dir)
    return checkpoint_path(run_dir).read_bytes()


def _doctored(tiny, change) -> bytes:
    """The good checkpoint with `change(state)` applied, re-saved like the runner saves."""
    import io

    state = torch.load(io.BytesIO(tiny["good"]), weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Payload:
    """An arbitrary pickled object: `weights_only=True` refuses to construct it."""

    def __reduce__(self):
        return (os.getcwd, ())


def _bad_checkpoints(tiny) -> dict[str, tuple[bytes, str]]:
    good = tiny["good"]
    n = len(good)
    garbage = torch.Generator().manual_seed(0)
    other_config = "written by a different configuration"
    truncated = "cannot be read: truncated or corrupt"
    unreadable = "cannot be read: not a checkpoint of plain tensors"

    def other_arch(state):
        state["model"] = build_model("resnet", 14, "A", 10).state_dict()

    def no_optimizer(state):
        del state["optimizer"]

    def foreign_pickle() -> bytes:
        import io

        buffer = io.BytesIO()
        torch.save({"payload": _Payload()}, buffer)
        return buffer.getvalue()

    return {
        "empty": (b"", "is empty (0 bytes)"),
        "truncated-1": (good[:1], unreadable),
        "truncated-100": (good[:100], truncated),
        "truncated-4k": (good[:4096], truncated),
        "truncated-half": (good[: n // 2], truncated),
        "truncated-last-byte": (good[:-1], truncated),
        "garbage": (torch.randint(0, 256, (n,), generator=garbage, dtype=torch.uint8).numpy().tobytes(), unreadable),
        "lfs-pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123\n", unreadable),
        "unsafe-pickle": (foreign_pickle(), unreadable),
        "plain-state-dict": (_doctored(tiny, lambda s: s.clear() or s.update(build_model("resnet", 8).state_dict())),
                             "is not a resnet_repro checkpoint"),
        "incomplete": (_doctored(tiny, no_optimizer), "is incomplete (missing optimizer)"),
        "other-depth-run": (_other_run_checkpoint(tiny, "depth14", ["model.depth=14"]), other_config),
        "plain-net-run": (_other_run_checkpoint(tiny, "plain", ["model=plain"]), other_config),
        "other-lr-run": (_other_run_checkpoint(tiny, "lr", ["optim.lr=0.05"]), other_config),
        "other-arch-same-hash": (_doctored(tiny, other_arch), "holds a different architecture"),
    }


def test_every_corrupt_or_foreign_checkpoint_is_rejected_before_training(tiny, tmp_path):
    cfg = compose_config(tiny["overrides"])
    cases = _bad_checkpoints(tiny)
    assert len(cases) >= 12
    for name, (content, reason) in cases.items():
        run_dir = tmp_path / name
        path = checkpoint_path(run_dir)
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            train_in_process(copy.deepcopy(cfg), run_dir)
        message = str(info.value)
        assert str(path) in message and reason in message, (name, message)
        assert "to start this run over, delete" in message, (name, message)
        assert "weights_only` set to `False`" not in message  # no advice to load an unknown file unsafely
        assert path.read_bytes() == content, name  # nothing was overwritten
        assert not (run_dir / "metrics.json").exists() and not list(run_dir.glob("events.out.tfevents.*")), name


def test_a_truncated_checkpoint_through_the_command_line_exits_2_without_a_traceback(tiny, tmp_path):
    run_dir = tmp_path / "run"
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(tiny["good"][: len(tiny["good"]) // 3])
    proc = run_cli([*tiny["overrides"], f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert str(path) in proc.stdout and "cannot be read: truncated or corrupt" in proc.stdout
    assert f"to start this run over, delete {path}" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert "iter 2/4" not in proc.stdout and not (run_dir / "metrics.json").exists()  # no step was taken


def test_rng_state_keeps_the_run_devices_generator_and_restores_it_on_the_resumed_runs_device(monkeypatch):
    """A run saved on cuda:3 of an 8-GPU machine resumes on cuda:0 of a 1-GPU one (or on another sweep slot):
    the checkpoint holds the CPU generator and the run device's CUDA generator only, and a resume puts that one
    on its own device. torch.cuda is mocked: no GPU here."""
    cuda_states = {index: torch.full((4,), index, dtype=torch.uint8) for index in range(8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    torch.manual_seed(7)
    saved = rng_state(torch.device("cuda", 3))
    assert set(saved) == {"cpu", "cuda"} and torch.equal(saved["cuda"], cuda_states[3])
    torch.manual_seed(8)
    restore_rng_state(saved, torch.device("cuda", 0))
    assert torch.equal(torch.get_rng_state(), saved["cpu"])
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_states[3])
    assert torch.device(restored[0][1]) == torch.device("cuda", 0)
    restored.clear()
    restore_rng_state(saved, torch.device("cpu"))  # a CUDA run resumed on CPU: the CPU generator only
    assert restored == [] and set(rng_state(torch.device("cpu"))) == {"cpu"}
    legacy = {"cpu": saved["cpu"], "cuda": [cuda_states[i] for i in range(2)]}  # before 2026-12-01: every GPU's
    restore_rng_state(legacy, torch.device("cuda", 1))
    restore_rng_state(legacy, torch.device("cuda", 5))  # no entry for that index: left alone
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_states[1])
