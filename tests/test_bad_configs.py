"""Bad command lines are rejected in seconds, before a model is built, naming the full key and what is allowed.

Each case runs the real entry point (`resnet_repro.train.cli`: Hydra parsing, composition against the typed
schema, our validation, data loading) in this process with a patched `sys.argv`, which costs ~0.2 s instead of
the ~3 s of a new interpreter; a few cases also run as real `python -m resnet_repro.train` subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from reliability_support import (  # noqa: F401  (pinned_threads: an autouse fixture)
    cli_command,
    cli_env,
    in_process_entry,
    make_tiny_npz,
    pinned_threads,
)

import resnet_repro.train as train_module
from resnet_repro.run_dir import EXIT_CONFIG_ERROR

# (id, command-line arguments, substrings the output must contain: the full key and the allowed values)
# {npz}, {missing}, {garbage}, {no_arrays}, {wrong_dtype} are files made by the `files` fixture.
CASES = [
    ("depth-not-6n+2", ["model.depth=21"], ["model.depth=21", "6n+2", "20, 26"]),
    ("depth-not-an-int", ["model.depth=abc"], ["model.depth", "Integer"]),
    ("depth-empty", ["model.depth="], ["model.depth", "Integer"]),
    ("depth-for-resnet18", ["model=resnet18", "model.depth=20"], ["model.depth=20", "18 or null"]),
    ("bottleneck-depth-not-9n+2", ["model=bottleneck", "model.depth=30"], ["model.depth=30", "9n+2", "29, 38"]),
    ("shortcut-D", ["model.shortcut=D"], ["model.shortcut", "A, B, C"]),
    ("unknown-arch", ["model.arch=vgg"], ["model.arch='vgg'", "plain, resnet, preact, bottleneck, resnet18"]),
    ("unknown-model-group", ["model=vgg"], ["model/vgg", "plain", "resnet18"]),
    ("unknown-key", ["model.dept=20"], ["model.dept", "ModelConfig"]),
    ("unknown-top-level-key", ["lr=0.1"], ["Key 'lr'", "TrainConfig"]),
    ("override-without-value", ["optim.lr"], ["optim.lr", "EQUAL"]),
    ("negative-lr", ["optim.lr=-0.1"], ["optim.lr=-0.1", "positive"]),
    ("lr-not-a-number", ["optim.lr=fast"], ["optim.lr", "Float"]),
    ("momentum-out-of-range", ["optim.momentum=1.5"], ["optim.momentum=1.5", "[0, 1)"]),
    ("milestones-decreasing", ["optim.milestones=[48000,32000]"], ["optim.milestones", "strictly increasing"]),
    ("milestone-beyond-max-iter", ["optim.milestones=[32000,70000]"], ["optim.milestones", "optim.max_iter=64000"]),
    ("max-iter-without-its-milestones", ["optim.max_iter=1000"],
     ["optim.milestones=[32000, 48000]", "(0, optim.max_iter=1000)", "also set optim.milestones=[500,750]"]),
    ("max-iter-float", ["optim.max_iter=1e3"], ["optim.max_iter", "Integer"]),
    ("max-iter-zero", ["optim.max_iter=0", "optim.milestones=[]"], ["optim.max_iter=0", "positive"]),
    ("warmup-threshold-not-percent", ["optim.warmup_until_err=150"], ["optim.warmup_until_err=150.0", "(0, 100]"]),
    ("batch-zero", ["data.batch_size=0"], ["data.batch_size=0", "positive integer"]),
    ("batch-larger-than-the-training-split", ["data=npz", "data.path={npz}", "data.batch_size=100000"],
     ["data.batch_size=100000", "at most the 120 images of the training split"]),
    ("batch-larger-than-what-val-split-leaves", ["data=npz", "data.path={npz}", "data.val_split=40",
                                                 "data.batch_size=100"],
     ["data.batch_size=100", "at most the 80 images of the training split"]),
    ("batch-not-divisible-by-processes", ["data.batch_size=128", "@WORLD_SIZE=3"],
     ["data.batch_size=128", "divisible by the number of processes (3)"]),
    ("bn-group-not-dividing-batch", ["model.bn_group=48"], ["model.bn_group=48", "divide the per-process batch 128"]),
    ("augment-not-bool", ["data.augment=maybe"], ["data.augment", "bool"]),
    ("normalize-imagenet", ["data.normalize=imagenet"], ["data.normalize", "pixel_mean, channel"]),
    ("negative-val-split", ["data.val_split=-5"], ["data.val_split=-5", "0 or a positive number"]),
    ("val-split-too-large", ["data=npz", "data.path={npz}", "data.val_split=500"],
     ["data.val_split=500", "smaller than the 120 training images"]),
    ("npz-without-path", ["data=npz"], ["data.path", "data=npz needs data.path=FILE.npz"]),
    ("npz-missing-file", ["data=npz", "data.path={missing}"], ["data.path=", "missing.npz", "file not found"]),
    ("npz-garbage", ["data=npz", "data.path={garbage}"], ["data.path=", "garbage.npz", "not a readable .npz"]),
    ("npz-missing-arrays", ["data=npz", "data.path={no_arrays}"], ["data.path=", "missing arrays", "x_test"]),
    ("npz-wrong-dtype", ["data=npz", "data.path={wrong_dtype}"], ["data.path=", "x_train must be uint8"]),
    ("fp16-on-cpu", ["trainer.precision=fp16", "trainer.device=cpu"], ["trainer.precision='fp16'", "fp16 needs CUDA"]),
    ("cuda-without-gpu", ["trainer.device=cuda"], ["trainer.device='cuda'", "trainer.device=cpu or auto"]),
    ("unknown-device", ["trainer.device=tpu"], ["trainer.device", "auto, cuda, cpu"]),
    ("cuda-graphs-on-cpu", ["trainer.cuda_graphs=true", "trainer.device=cpu"],
     ["trainer.cuda_graphs=True", "CUDA graphs need a GPU"]),
    ("log-every-zero", ["trainer.log_every=0"], ["trainer.log_every=0", "positive number of iterations"]),
    ("seed-float", ["seed=1.5"], ["seed", "Integer"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, sample_npz):
    root = tmp_path_factory.mktemp("bad_configs")
    (root / "garbage.npz").write_bytes(b"\x00not an npz at all" * 64)
    np.savez(root / "no_arrays.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.int64))
    with np.load(sample_npz) as z:
        np.savez(root / "wrong_dtype.npz", x_train=z["x_train"][:8].astype(np.float32), y_train=z["y_train"][:8],
                 x_test=z["x_test"][:8], y_test=z["y_test"][:8])
    return {"npz": make_tiny_npz(sample_npz, root / "tiny.npz"), "missing": root / "missing.npz",
            "garbage": root / "garbage.npz", "no_arrays": root / "no_arrays.npz",
            "wrong_dtype": root / "wrong_dtype.npz"}


@pytest.fixture
def isolated_logging():
    with in_process_entry():
        yield


def _expand(args: list[str], files: dict) -> tuple[list[str], dict[str, str]]:
    env = {a[1:].split("=")[0]: a.split("=", 1)[1] for a in args if a.startswith("@")}
    return [a.format(**files) for a in args if not a.startswith("@")], env


def test_the_bad_command_lines_are_distinct_and_many():
    assert len(CASES) >= 20 and len({tuple(args) for _, args, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line_is_rejected_before_a_model_is_built(args, expected, files, tmp_path, monkeypatch, capsys,
                                                              isolated_logging):
    if "trainer.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present, so trainer.device=cuda is valid here")
    argv, env = _expand(args, files)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    built = []
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: built.append(a))
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: built.append("fit"))
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["resnet_repro.train", *argv, f"hydra.run.dir={run_dir}"])
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        train_module.cli()
    elapsed = time.monotonic() - start
    out = "".join(capsys.readouterr())
    assert info.value.code == EXIT_CONFIG_ERROR, out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    assert built == [] and not (run_dir / "checkpoints").exists()
    assert "Traceback" not in out
    assert elapsed < 30, elapsed  # "in seconds": nothing downloaded or trained first (loose: shared CI machines)


# The real command line, three processes at once: exit status 2, the key named, no traceback, no model.
CLI_CASES = [
    ("depth-not-6n+2", ["model.depth=21"], "model.depth=21"),  # our validation
    ("shortcut-D", ["model.shortcut=D"], "model.shortcut"),  # Hydra's schema check, made exit 2 by `cli`
    ("npz-missing-file", ["data=npz", "data.path={missing}"], "data.path="),  # a file check
]


def test_bad_command_lines_through_the_real_cli(files, tmp_path):
    procs = []
    for name, args, _ in CLI_CASES:
        run_dir = tmp_path / name
        argv, _ = _expand(args, files)
        procs.append(subprocess.Popen(cli_command([*argv, f"hydra.run.dir={run_dir}"]), cwd=REPO, env=cli_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for (name, _, key), proc in zip(CLI_CASES, procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out)
        assert key in out and "Traceback" not in out, (name, out)
        assert "parameters" not in out and not (tmp_path / name / "checkpoints").exists(), (name, out)
