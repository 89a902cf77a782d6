"""The real runner on CUDA (bf16, channels_last, fused SGD; eager, compiled, CUDA-graphed): it learns on real
CIFAR-10 images and records what it ran. Marked `gpu`: skipped without CUDA (dev/gpu_check.sh runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability_support import compose_config

from resnet_repro.engine import DistInfo
from resnet_repro.run_dir import METRICS_NAME
from resnet_repro.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    "speed", [[], ["trainer.compile=true"], ["trainer.cuda_graphs=true"]], ids=["eager", "compiled", "graphed"]
)
def test_the_runner_learns_on_cuda(sample_npz: Path, tmp_path: Path, speed: list[str]) -> None:
    """ResNet-20, batch 128, lr 0.1 then 0.01, 200 iterations on the 5,085 sample images: far below chance (90 %).

    The anchor (brief): a plain PyTorch ResNet-20 reaches about 55 % test error on the sample after 200 iterations.
    """
    cfg = compose_config(
        ["data=npz", f"data.path={sample_npz}", "trainer.progress=false", "optim.max_iter=200",
         "optim.milestones=[150,190]", "trainer.eval_every=100", "trainer.log_every=50", *speed]
    )
    metrics = train(cfg, tmp_path / "run", DistInfo())
    written = json.loads((tmp_path / "run" / METRICS_NAME).read_text())
    assert (metrics["precision"], metrics["iterations"]) == ("bf16", 200)
    assert torch.cuda.get_device_name() in metrics["device"], metrics["device"]
    assert metrics["final_test_err"] < 70.0, metrics["final_test_err"]
    assert metrics["final_train_err"] < 80.0, metrics["final_train_err"]
    assert written["final_test_err"] == metrics["final_test_err"]
