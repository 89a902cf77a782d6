"""Correctness gates for the speed features: the fast step computes the eager step's update.

What is compared, and why these tolerances:
- The math: channels_last + fused SGD (TrainStep) against contiguous + for-loop SGD (eager), in float64, where
  rounding cannot hide a difference: gradients, weights after the step and BN buffers within 1e-5 relative
  (measured: ~6e-8, from TrainStep's fp32 cross-entropy on the logits).
- The runner's CPU path in fp32 (contiguous + fused SGD through TrainStep) against eager fp32: within 1e-5.
  Not compared in fp32: channels_last on CPU. Its kernels round differently, and at He init the differences are
  amplified layer by layer through ReLU masks and BN; measured gradient differences reach ~1e-2 relative at
  depth 20 (~2e-6 for the contiguous path against float64), which is why trainer.channels_last defaults to CUDA.
- bf16 autocast against fp32, on a depth-8 net: BF16_* below; measured on CPU at batch 32 with seeds 0-5:
  whole-gradient relative error 0.04-0.07, cosine >= 0.998, worst single tensor (a BN bias) 0.22.
- Learning rates: the rate the optimizer applied, recovered from the update itself, follows `lr_at` across a
  milestone for the eager and the fast configuration alike.
- Augmentation: `DeviceData.train_batch` equals a per-image reference (pad 4 with zeros after normalisation, crop,
  flip) written here, also for channels_last input, the CUDA-graph indexing path and CUDA; the epoch plan's crop
  offsets and flips have the intended distribution and do not depend on the device.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from resnet_repro.bench.measure import random_cifar
from resnet_repro.data import PAD, DeviceData, crop_and_flip, plan_epoch
from resnet_repro.models import build_model
from resnet_repro.optim import lr_at, make_sgd, set_lr
from resnet_repro.step import Accumulators, EagerIteration, GraphedIteration, TrainStep

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4
FP_TOL = 1e-5
BF16_GLOBAL_TOL = 0.15  # relative error of the whole gradient vector, bf16 autocast vs fp32
BF16_COSINE_MIN = 0.99  # cosine similarity of the whole gradient vectors
BF16_TENSOR_TOL = 0.4  # relative error of the worst single parameter's gradient
BF16_LOSS_TOL = 0.02  # relative error of the loss
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference of a to the reference b."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def batch(n: int, seed: int, dtype=torch.float32, device=CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed normalised-looking batch and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def fresh_model(depth: int, seed: int, dtype=torch.float32, device=CPU) -> torch.nn.Module:
    """A He-initialised paper ResNet."""
    torch.manual_seed(seed)
    return build_model("resnet", depth).to(device=device, dtype=dtype)


def eager_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The textbook step: contiguous model, torch.optim.SGD with the for-loop implementation; returns gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=False)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return grads


def fast_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, fused: bool):
    """Our TrainStep with make_sgd; returns (gradients, summed loss)."""
    step = TrainStep(model, make_sgd(model, LR, MOMENTUM, WD, fused=fused), precision, x.device)
    loss_sum, _, bad = step(x, y)
    assert not bool(bad)
    return [p.grad.detach().clone() for p in model.parameters()], loss_sum.item() / len(y)


def assert_same_step(ref: torch.nn.Module, ref_grads, fast: torch.nn.Module, fast_grads, tol: float) -> None:
    """Gradients, weights after the update and BN running statistics agree within `tol` (relative)."""
    names = [n for n, _ in ref.named_parameters()]
    for name, g_ref, g_fast in zip(names, ref_grads, fast_grads, strict=True):
        assert rel(g_fast, g_ref) <= tol, f"gradient of {name}: {rel(g_fast, g_ref):.3g}"
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert rel(p_fast, p_ref) <= tol, f"{name} after the step: {rel(p_fast, p_ref):.3g}"
    for (name, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers(), strict=True):
        if b_ref.dtype.is_floating_point:
            assert rel(b_fast, b_ref) <= tol, f"buffer {name}: {rel(b_fast, b_ref):.3g}"
        else:
            assert torch.equal(b_fast, b_ref), name


def assert_within_bf16_band(ref_grads, ref_loss: float, low_grads, low_loss: float) -> None:
    """A bf16 step's loss and gradients lie within the documented band around the fp32 step's."""
    g_ref, g_low = torch.cat([g.flatten() for g in ref_grads]), torch.cat([g.flatten() for g in low_grads])
    assert abs(low_loss - ref_loss) / ref_loss <= BF16_LOSS_TOL
    assert rel(g_low, g_ref) <= BF16_GLOBAL_TOL
    assert F.cosine_similarity(g_low, g_ref, dim=0).item() >= BF16_COSINE_MIN
    assert max(rel(a, b) for a, b in zip(low_grads, ref_grads, strict=True)) <= BF16_TENSOR_TOL


@pytest.mark.parametrize(("depth", "n"), [(8, 32), (20, 8)])
def test_channels_last_fused_step_equals_eager_step_in_float64(depth: int, n: int) -> None:
    """Speed features change no math: channels_last + fused SGD + TrainStep == contiguous + for-loop SGD."""
    model = fresh_model(depth, seed=depth, dtype=torch.float64)
    x, y = batch(n, seed=depth, dtype=torch.float64)
    ref, fast = copy.deepcopy(model), copy.deepcopy(model).to(memory_format=torch.channels_last)
    ref_grads = eager_step(ref, x, y)
    fast_grads, _ = fast_step(fast, x, y, "fp32", fused=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_step(ref, ref_grads, fast, fast_grads, FP_TOL)


@pytest.mark.parametrize(("depth", "fused"), [(8, True), (8, False), (20, True)])
def test_runner_cpu_step_equals_eager_step_in_fp32(depth: int, fused: bool) -> None:
    """The runner's CPU configuration (fp32, contiguous, fused or foreach SGD) matches the eager fp32 step."""
    model = fresh_model(depth, seed=1)
    x, y = batch(16, seed=2)
    ref, fast = copy.deepcopy(model), copy.deepcopy(model)
    ref_grads = eager_step(ref, x, y)
    fast_grads, _ = fast_step(fast, x, y, "fp32", fused=fused)
    assert_same_step(ref, ref_grads, fast, fast_grads, FP_TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_gradients_within_documented_tolerance(seed: int) -> None:
    """bf16 autocast (weights, BN and loss in fp32) stays within the module docstring's measured band."""
    model = fresh_model(8, seed=seed)
    x, y = batch(32, seed=seed)
    ref, low = copy.deepcopy(model), copy.deepcopy(model)
    ref_grads, ref_loss = fast_step(ref, x, y, "fp32", fused=True)
    low_grads, low_loss = fast_step(low, x, y, "bf16", fused=True)
    assert_within_bf16_band(ref_grads, ref_loss, low_grads, low_loss)
    assert all(p.dtype == torch.float32 for p in low.parameters())  # autocast keeps fp32 master weights


def applied_lrs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_step, lrs: list[float]) -> list[float]:
    """Run one step per lr (set with optim.set_lr) and recover the rate actually applied from each update.

    SGD with momentum: p_new = p_old - lr * buf, with buf the momentum buffer after the step, so
    lr = <p_old - p_new, buf> / <buf, buf> (over all parameters).
    """
    used = []
    for i, lr in enumerate(lrs):
        set_lr(optimizer, lr)
        before = [p.detach().double().clone() for p in model.parameters()]
        run_step(i)
        num = den = 0.0
        for p, old in zip(model.parameters(), before, strict=True):
            buf = optimizer.state[p]["momentum_buffer"].double()
            num += ((old - p.detach().double()) * buf).sum().item()
            den += (buf * buf).sum().item()
        used.append(num / den)
    return used


@pytest.mark.parametrize("config", ["eager", "fast"])
def test_lr_applied_by_the_optimizer_follows_lr_at(config: str) -> None:
    """Across a milestone, the rate in each update is lr_at(i) for plain SGD and for bf16 + fused SGD."""
    milestones, steps = [2, 4], 6
    expected = [lr_at(i, LR, milestones, 0.1) for i in range(steps)]
    model = fresh_model(8, seed=3, dtype=torch.float64 if config == "eager" else torch.float32)
    data = DeviceData(random_cifar(64, 8), None, CPU, "pixel_mean", True, seed=0)
    if config == "eager":
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=False)

        def run_step(i: int) -> None:
            x, y = data.train_batch(i, 16)
            optimizer.zero_grad()
            F.cross_entropy(model(x.double()), y).backward()
            optimizer.step()
    else:
        optimizer = make_sgd(model, LR, MOMENTUM, WD, fused=True)
        step = TrainStep(model, optimizer, "bf16", CPU)

        def run_step(i: int) -> None:
            step(*data.train_batch(i, 16))

    used = applied_lrs(model, optimizer, run_step, expected)
    assert used == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------- augmentation
def reference_augment(
    image_hwc: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, oy: int, ox: int, flip: bool
) -> torch.Tensor:
    """One image, pixel by pixel: normalise, zero-pad PAD on each side, crop 32x32 at (oy, ox), mirror if asked."""
    img = (image_hwc.permute(2, 0, 1).float() / 255.0 - mean[0]) * scale[0]  # (3, 32, 32)
    out = torch.zeros(3, 32, 32)
    for c in range(3):
        for r in range(32):
            for col in range(32):
                src_col = 31 - col if flip else col  # mirror the cropped window
                py, px = oy + r - PAD, ox + src_col - PAD  # position in the unpadded image
                if 0 <= py < 32 and 0 <= px < 32:
                    out[c, r, col] = img[c, py, px]
    return out


def test_train_batch_equals_per_image_reference() -> None:
    """Batched gather == reference for every image of two batches (one across an epoch boundary)."""
    arrays = random_cifar(40, 8, seed=5)
    data = DeviceData(arrays, None, CPU, "pixel_mean", True, seed=7)
    for iteration in (1, 3):  # batch 12: iteration 3 takes positions 36..47, crossing into epoch 1
        images, labels = data.train_batch(iteration, 12)
        idx, oy, ox, flip = data.stream_indices(iteration * 12, 12)
        assert flip.any() and not flip.all() and len(set(oy.tolist())) > 1
        for k in range(12):
            i = int(idx[k])
            want = reference_augment(
                arrays.x_train[i], data.normalizer.mean, data.normalizer.scale, int(oy[k]), int(ox[k]), bool(flip[k])
            )
            assert torch.equal(images[k], want), f"image {k} of iteration {iteration}"
            assert labels[k] == arrays.y_train[i]


def test_augmentation_ignores_memory_format_and_graph_path() -> None:
    """channels_last input and the CUDA-graph indexing path give bit-identical batches."""
    data = DeviceData(random_cifar(64, 8, seed=1), None, CPU, "pixel_mean", True, seed=3)
    images, labels = data.train_batch(2, 16)
    idx, oy, ox, flip = data.stream_indices(32, 16)
    normalized = data.normalizer(data.x_train[idx])
    cl = crop_and_flip(normalized.contiguous(memory_format=torch.channels_last), oy, ox, flip)
    assert torch.equal(cl, images)
    graph_images, graph_labels = data.gather(idx, oy, ox, flip)
    assert torch.equal(graph_images, images) and torch.equal(graph_labels, labels)


def test_epoch_plan_statistics() -> None:
    """One epoch: a permutation, crop offsets uniform on 0..2*PAD, flips with probability 1/2 (within 5 sigma)."""
    n = 9000
    plan = plan_epoch(n, seed=0, epoch=3, augment=True, device=CPU)
    assert torch.equal(plan.order.sort().values, torch.arange(n))
    for offsets in (plan.offset_y, plan.offset_x):
        counts = torch.bincount(offsets, minlength=2 * PAD + 1)
        assert len(counts) == 2 * PAD + 1
        p = 1 / (2 * PAD + 1)
        assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)) ** 0.5).all(), counts
    assert abs(plan.flip.float().sum().item() - n / 2) <= 5 * (n / 4) ** 0.5
    off = plan_epoch(n, seed=0, epoch=3, augment=False, device=CPU)
    assert (off.offset_y == PAD).all() and (off.offset_x == PAD).all() and not off.flip.any()


# -------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
def test_cuda_augmentation_and_plan_equal_cpu() -> None:
    """Same plan and bit-identical augmented batches on CUDA and CPU."""
    arrays = random_cifar(64, 8, seed=2)
    cpu = DeviceData(arrays, None, CPU, "pixel_mean", True, seed=4)
    gpu = DeviceData(arrays, None, torch.device("cuda"), "pixel_mean", True, seed=4)
    for it in (0, 5):
        for a, b in zip(cpu.stream_indices(it * 16, 16), gpu.stream_indices(it * 16, 16), strict=True):
            assert torch.equal(a, b.cpu())
        (xc, yc), (xg, yg) = cpu.train_batch(it, 16), gpu.train_batch(it, 16)
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)  # the normalisation may fuse differently


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fast_path", ["channels_last", "compiled"])
def test_cuda_fast_step_equals_eager_step_in_float64(fast_path: str) -> None:
    """The float64 gate on CUDA: channels_last tensors through our model and step, or Inductor's fused kernels
    (torch.compile), change no math. cuDNN has no float64 NHWC kernels (ATen's ConvUtils.h turns NHWC off for
    double), so the channels_last case checks the layout's handling, not cuDNN's NHWC kernels: those run (in bf16)
    in the bf16-band and graph tests below, against a tolerance rather than float64."""
    dev = torch.device("cuda")
    model = fresh_model(8, seed=0, dtype=torch.float64, device=dev)
    x, y = batch(32, seed=0, dtype=torch.float64, device=dev)
    ref, fast = copy.deepcopy(model), copy.deepcopy(model)
    ref_grads = eager_step(ref, x, y)
    if fast_path == "channels_last":
        fast_grads, _ = fast_step(fast.to(memory_format=torch.channels_last), x, y, "fp32", fused=True)
    else:
        step = TrainStep(torch.compile(fast), make_sgd(fast, LR, MOMENTUM, WD, fused=True), "fp32", dev)
        assert not bool(step(x, y)[2])
        fast_grads = [p.grad for p in fast.parameters()]
    assert_same_step(ref, ref_grads, fast, fast_grads, FP_TOL)


GRAPH_CONFIGS = {  # (precision, channels_last, torch.compile): fit's graphed configurations
    "fp32": ("fp32", False, False),
    "bf16-channels_last": ("bf16", True, False),  # the runner's CUDA default with trainer.cuda_graphs=true
    "bf16-channels_last-compiled": ("bf16", True, True),  # + trainer.compile=true (bench config 5)
}
# Graph and eager run the same kernels on the same data, so they agree to rounding: fp32 within FP_TOL; bf16
# within GRAPH_BF16_TOL, loose enough for a reordered sum rounded in bf16, far below what a real capture fault
# leaves after 12 iterations (a rate frozen at 0.1, or the 3 warm-up updates not undone, move weights by ~1e-2).
GRAPH_BF16_TOL = 1e-3


def _graph_and_eager(dev: torch.device, config: str):
    """An EagerIteration and a captured GraphedIteration over the same data and the same initial model."""
    precision, channels_last, compiled = GRAPH_CONFIGS[config]
    data = DeviceData(random_cifar(256, 8, seed=0), None, dev, "pixel_mean", True, seed=0)  # 8 iterations/epoch
    fmt = torch.channels_last if channels_last else torch.preserve_format
    models = [fresh_model(8, seed=0, device=dev).to(memory_format=fmt) for _ in range(2)]
    opts = [make_sgd(m, LR, MOMENTUM, WD, fused=True) for m in models]
    run = [torch.compile(m) if compiled else m for m in models]
    steps = [TrainStep(r, o, precision, dev) for r, o in zip(run, opts, strict=True)]
    accs = [Accumulators.zeros(dev, 0) for _ in range(2)]
    eager = EagerIteration(steps[0], data, accs[0], 32)
    graphed = GraphedIteration(steps[1], data, accs[1], 32, capture=True)  # its warm-up steps are undone
    assert graphed.graph is not None
    return data, models, opts, accs, eager, graphed


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", list(GRAPH_CONFIGS))
def test_cuda_graph_iteration_equals_eager_iteration(config: str) -> None:
    """The captured iteration (aug + fwd + bwd + fused SGD + sums) replays what the eager one does: 12 iterations
    across an epoch boundary and two rate changes; weights, BN buffers, momentum buffers and the interval sums."""
    dev = torch.device("cuda")
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # no atomics in the weight gradients: both sides run the same sums
    try:
        _, models, opts, accs, eager, graphed = _graph_and_eager(dev, config)
        for i, lr in enumerate([0.1] * 4 + [0.01] * 4 + [0.001] * 4):
            eager(i, lr)
            graphed(i, lr)
        torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.deterministic = deterministic
    tol = FP_TOL if GRAPH_CONFIGS[config][0] == "fp32" else GRAPH_BF16_TOL
    for p_ref, p_graph in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert rel(p_graph, p_ref) <= tol
        m_ref, m_graph = opts[0].state[p_ref]["momentum_buffer"], opts[1].state[p_graph]["momentum_buffer"]
        assert rel(m_graph, m_ref) <= tol
    for b_ref, b_graph in zip(models[0].buffers(), models[1].buffers(), strict=True):
        assert rel(b_graph.float(), b_ref.float()) <= tol
    for a_ref, a_graph in zip(accs[0].tensors(), accs[1].tensors(), strict=True):
        assert rel(a_graph, a_ref) <= tol


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_guard_skips_a_nonfinite_update_and_names_its_iteration() -> None:
    """Inside the graph, a NaN batch (here: the normaliser's mean, read by the graph, set to NaN for iteration 3)
    leaves weights and momentum untouched and records 3 as the first bad iteration; training goes on after it."""
    dev = torch.device("cuda")
    data, models, opts, accs, _, graphed = _graph_and_eager(dev, "fp32")
    model, opt, acc = models[1], opts[1], accs[1]

    def state() -> list[torch.Tensor]:
        return [t.detach().clone() for p in model.parameters() for t in (p, opt.state[p]["momentum_buffer"])]

    for i in range(3):
        graphed(i, LR)
    before = state()
    mean = data.normalizer.mean.clone()
    data.normalizer.mean.fill_(float("nan"))
    graphed(3, LR)
    data.normalizer.mean.copy_(mean)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(state(), before, strict=True))
    assert int(acc.first_bad) == 3
    graphed(4, LR)
    torch.cuda.synchronize()
    assert not all(torch.equal(a, b) for a, b in zip(state(), before, strict=True))
    assert int(acc.first_bad) == 3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_bf16_channels_last_step_within_documented_tolerance(seed: int) -> None:
    """The runner's CUDA step (bf16 autocast, channels_last, fused SGD) against the fp32 eager step on CUDA.

    TF32 is switched off for the reference, so the band measures bf16 alone (the same band as on CPU)."""
    dev = torch.device("cuda")
    model = fresh_model(8, seed=seed, device=dev)
    x, y = batch(32, seed=seed, device=dev)
    ref, low = copy.deepcopy(model), copy.deepcopy(model).to(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref_grads, ref_loss = fast_step(ref, x, y, "fp32", fused=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    low_grads, low_loss = fast_step(low, x, y, "bf16", fused=True)
    assert_within_bf16_band(ref_grads, ref_loss, low_grads, low_loss)
