"""Model registry tests: exact parameter counts, structure, init, validation, serialisation, ghost BN."""

import io
import pickle

import pytest
import torch
from torch import nn

from resnet_repro.errors import ConfigError
from resnet_repro.models import ARCHS, build_model, count_parameters, validate_model_args
from resnet_repro.models.ghost_bn import GhostBatchNorm2d, use_ghost_batch_norm

SMALL_DEPTH = {"plain": 20, "resnet": 20, "preact": 20, "bottleneck": 29, "resnet18": None}
TINY_DEPTH = {"plain": 8, "resnet": 8, "preact": 8, "bottleneck": 11, "resnet18": None}  # one block per stage

# Exact parameter counts of the CIFAR nets, 10 classes: depth -> (option A = plain, option B, option C)
PAPER_COUNTS = {
    20: (269_722, 272_474, 283_962),
    56: (853_018, 855_770, 900_858),
    110: (1_727_962, 1_730_714, 1_826_202),
}


def paper_count(depth: int, shortcut: str, num_classes: int = 10) -> int:
    """Closed-form parameter count of the paper's CIFAR net (conv no bias, BN gamma+beta, FC with bias)."""
    n = (depth - 2) // 6
    widths = (16, 32, 64)

    def conv(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k

    total = conv(3, 16, 3) + 2 * 16 + 64 * num_classes + num_classes
    c_in = 16
    for w in widths:
        for block in range(n):
            first_in = c_in if block == 0 else w
            total += conv(first_in, w, 3) + conv(w, w, 3) + 2 * 2 * w
            if shortcut == "C" or (shortcut == "B" and first_in != w):
                total += conv(first_in, w, 1) + 2 * w
        c_in = w
    return total


def _small(arch: str, **kwargs) -> nn.Module:
    return build_model(arch, SMALL_DEPTH[arch], **kwargs)


def _tiny(arch: str) -> nn.Module:
    return build_model(arch, TINY_DEPTH[arch])


@pytest.mark.parametrize("depth", sorted(PAPER_COUNTS))
@pytest.mark.parametrize("column, shortcut", list(enumerate("ABC")))
def test_paper_table_counts(depth: int, column: int, shortcut: str) -> None:
    expected = PAPER_COUNTS[depth][column]
    assert paper_count(depth, shortcut) == expected
    assert count_parameters(build_model("resnet", depth, shortcut)) == expected


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110, 1202])
def test_closed_form_counts_and_plain_equals_option_a(depth: int) -> None:
    for shortcut in "ABC":
        assert count_parameters(build_model("resnet", depth, shortcut)) == paper_count(depth, shortcut)
    assert count_parameters(build_model("plain", depth)) == paper_count(depth, "A")


def test_table6_rounded_counts() -> None:
    paper_millions = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
    for depth, millions in paper_millions.items():
        digits = 1 if millions >= 1 else 2
        assert round(paper_count(depth, "A") / 1e6, digits) == millions


def test_other_arch_counts() -> None:
    assert count_parameters(build_model("resnet18")) == 11_173_962
    assert count_parameters(build_model("resnet18", 18)) == 11_173_962
    bottleneck_164 = count_parameters(build_model("bottleneck", 164))
    assert bottleneck_164 == 1_703_258
    assert 1_600_000 <= bottleneck_164 <= 1_800_000
    assert count_parameters(build_model("preact", 110, "A")) == 1_727_962
    assert count_parameters(build_model("preact", 110, "B")) == 1_730_522


@pytest.mark.parametrize("arch", ["plain", "resnet", "preact"])
def test_option_a_has_no_shortcut_parameters(arch: str) -> None:
    names = [name for name, _ in build_model(arch, 20, "A").named_parameters()]
    assert names and not any("shortcut" in name for name in names)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch: str) -> None:
    model = _small(arch, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("arch", ARCHS)
def test_init(arch: str) -> None:
    model = _small(arch)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and norms
    assert all(conv.bias is None for conv in convs)
    for bn in norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    # He init, fan_out: std = sqrt(2 / (out_channels * k * k)); check on the largest conv
    conv = max(convs, key=lambda c: c.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


@pytest.mark.parametrize("shortcut, stride2_convs", [("A", 2), ("B", 4), ("C", 4)])
def test_paper_net_downsampling(shortcut: str, stride2_convs: int) -> None:
    model = build_model("resnet", 20, shortcut)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == stride2_convs
    assert sum(m.kernel_size == (3, 3) for m in strided) == 2
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize(
    "arch, depth, shortcut, key, valid",
    [
        ("resnet", 21, "A", "model.depth", "6n+2"),
        ("resnet", 21, "A", "model.depth", "20, 26"),
        ("plain", 0, "A", "model.depth", "6n+2"),
        ("resnet", 5, "A", "model.depth", "nearest valid depths: 8"),
        ("preact", -4, "A", "model.depth", "6n+2"),
        ("bottleneck", 20.5, "A", "model.depth", "9n+2"),
        ("bottleneck", 30, "A", "model.depth", "29, 38"),
        ("resnet", None, "A", "model.depth", "6n+2"),
        ("resnet18", 20, "A", "model.depth", "18"),
        ("resnet", 20, "D", "model.shortcut", "A, B, C"),
        ("plain", 20, "D", "model.shortcut", "A, B, C"),
        ("preact", 20, "C", "model.shortcut", "A, B"),
        ("vgg", 20, "A", "model.arch", ", ".join(ARCHS)),
    ],
)
def test_invalid_args(arch: str, depth: object, shortcut: str, key: str, valid: str) -> None:
    for call in (validate_model_args, build_model):
        with pytest.raises(ConfigError) as info:
            call(arch, depth, shortcut)
        assert key in str(info.value) and valid in str(info.value)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_pickle_and_state_dict_round_trip(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _tiny(arch)
    x = torch.randn(2, 3, 32, 32)
    expected = _outputs(model, x)
    assert torch.equal(_outputs(pickle.loads(pickle.dumps(model)), x), expected)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(_outputs(torch.load(buffer, weights_only=False), x), expected)

    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    fresh = _tiny(arch)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(_outputs(fresh, x), expected)


def _random_bn_pair(channels: int, group_size: int) -> tuple[nn.BatchNorm2d, GhostBatchNorm2d]:
    bn = nn.BatchNorm2d(channels)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    ghost = GhostBatchNorm2d(channels, group_size)
    ghost.load_state_dict(bn.state_dict())
    return bn, ghost


def test_ghost_bn_matches_separate_batch_norms() -> None:
    torch.manual_seed(0)
    g = 4
    bn, ghost = _random_bn_pair(3, g)
    x = torch.randn(2 * g, 3, 5, 5) * 3 + 1
    halves = [nn.BatchNorm2d(3) for _ in range(2)]
    for half in halves:
        half.load_state_dict(bn.state_dict())
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    expected = torch.cat([half(part) for half, part in zip(halves, x_ref.split(g), strict=True)])
    out = ghost(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)  # the backward pass too
    for name in ("weight", "bias"):
        summed = getattr(halves[0], name).grad + getattr(halves[1], name).grad
        torch.testing.assert_close(getattr(ghost, name).grad, summed, atol=1e-4, rtol=0)
    # running stats: the average of the two separate BNs' (same start, same momentum)
    for name in ("running_mean", "running_var"):
        average = (getattr(halves[0], name) + getattr(halves[1], name)) / 2
        torch.testing.assert_close(getattr(ghost, name), average, atol=1e-6, rtol=0)
    assert ghost.num_batches_tracked.item() == 1


def test_ghost_bn_cumulative_average_and_channels_last() -> None:
    """momentum=None (cumulative averages) over two steps, and channels_last in gives channels_last out."""
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(3, 4, momentum=None)
    halves = [nn.BatchNorm2d(3, momentum=None) for _ in range(2)]
    for _ in range(2):
        x = torch.randn(8, 3, 5, 5) * 2 + 1
        ghost(x)
        for half, part in zip(halves, x.split(4), strict=True):
            half(part)
    for name in ("running_mean", "running_var"):
        average = (getattr(halves[0], name) + getattr(halves[1], name)) / 2
        torch.testing.assert_close(getattr(ghost, name), average, atol=1e-6, rtol=0)
    assert ghost.num_batches_tracked.item() == 2
    x = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    out = ghost(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ghost(x.contiguous()), atol=1e-6, rtol=0)


def test_ghost_bn_whole_batch_and_eval_equal_batch_norm() -> None:
    torch.manual_seed(0)
    bn, ghost = _random_bn_pair(3, 8)
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_var, bn.running_var)
    bn.eval()
    ghost.eval()
    y = torch.randn(6, 3, 4, 4)  # 6 is not a multiple of 8: eval ignores the group size
    assert torch.equal(ghost(y), bn(y))


def test_ghost_bn_state_dict_keys_and_bad_batch() -> None:
    ghost = GhostBatchNorm2d(3, 4)
    assert list(ghost.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    with pytest.raises(ValueError, match="model.bn_group"):
        ghost(torch.randn(6, 3, 2, 2))


def test_use_ghost_batch_norm() -> None:
    model = build_model("resnet", 8, "B")
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.normal_(bn.weight)
            bn.running_mean.normal_()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert use_ghost_batch_norm(model, 0) is model
    assert not any(isinstance(m, GhostBatchNorm2d) for m in model.modules())

    use_ghost_batch_norm(model, 2)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, GhostBatchNorm2d) and m.group_size == 2 for m in norms)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    with pytest.raises(ConfigError, match="model.bn_group"):
        use_ghost_batch_norm(model, -1)
