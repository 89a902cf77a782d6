"""Figure 7 responses: which modules are hooked, and that the statistic equals a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.errors import ConfigError
from resnet_repro.models import ARCHS, build_model
from resnet_repro.models.responses import layer_response_std, response_modules


@pytest.mark.parametrize("arch", ["plain", "resnet"])
@pytest.mark.parametrize("depth, shortcut", [(8, "A"), (20, "A"), (20, "C"), (32, "B")])
def test_response_modules(arch: str, depth: int, shortcut: str) -> None:
    model = build_model(arch, depth, shortcut)
    modules = response_modules(model)
    assert len(modules) == depth - 1  # 6n+1: every 3x3 conv layer
    assert all(isinstance(m, nn.BatchNorm2d) for m in modules)
    projection_norms = {id(m) for name, m in model.named_modules() if "shortcut" in name}
    assert not projection_norms & {id(m) for m in modules}


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch not in ("plain", "resnet")])
def test_response_modules_other_arches(arch: str) -> None:
    model = build_model(arch, {"preact": 8, "bottleneck": 11}.get(arch))
    with pytest.raises(ConfigError, match="Figure 7"):
        response_modules(model)


def _randomise(model: nn.Module) -> None:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 2.0)
            nn.init.normal_(bn.bias)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)


def _direct_stds(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Run the paper net by hand on all images at once; std of every BN output after a 3x3 conv."""
    responses = [model.bn1(model.conv1(images))]
    x = F.relu(responses[-1])
    for stage in model.stages:
        for block in stage:
            responses.append(block.bn1(block.conv1(x)))
            responses.append(block.bn2(block.conv2(F.relu(responses[-1]))))
            out = responses[-1] if block.shortcut is None else responses[-1] + block.shortcut(x)
            x = F.relu(out)
    return [r.double().std(unbiased=False).item() for r in responses]


@pytest.mark.parametrize("arch, shortcut", [("plain", "A"), ("resnet", "A"), ("resnet", "B")])
def test_layer_response_std_equals_direct_computation(arch: str, shortcut: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 8, shortcut)
    _randomise(model)
    model.train()
    images = torch.randn(10, 3, 32, 32)
    stds = layer_response_std(model, images, batch_size=4)
    assert model.training  # previous mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert len(stds) == 7
    model.eval()
    with torch.no_grad():
        expected = _direct_stds(model, images)
    assert stds == pytest.approx(expected, rel=1e-5)


def test_layer_response_std_keeps_eval_mode() -> None:
    model = build_model("resnet", 8).eval()
    assert len(layer_response_std(model, torch.randn(3, 3, 32, 32))) == 7
    assert not model.training
