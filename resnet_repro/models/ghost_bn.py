"""Ghost batch norm: BN statistics over fixed-size sub-batches (the paper's 64 images per GPU at batch 128)."""

import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.errors import ConfigError


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each consecutive group of ``group_size`` images on its own.

    Parameters, buffers and state_dict keys are those of BatchNorm2d. Running statistics move (with the usual
    momentum) toward the mean over groups of each group's mean and unbiased variance. In eval mode, or when
    ``group_size`` >= the batch size, it is exactly BatchNorm2d.

    One batch-norm kernel serves all groups: the batch is rearranged so that each (group, channel) pair is one
    channel of a (group_size, groups x C, H, W) batch, normalised by `F.batch_norm` (the kernel, and under
    autocast the precision, of BatchNorm2d itself) and arranged back: two copies of the activations instead of
    the ten elementwise passes of a per-group formula (`make bench` rows (3g) and (5bg) time it in a network).
    """

    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if not self.training or self.group_size >= batch:
            return super().forward(x)
        if batch % self.group_size:
            raise ConfigError(
                f"model.bn_group={self.group_size} does not divide the batch of {batch} images: "
                "use 0 (whole batch) or a divisor of the per-GPU batch size"
            )
        n, c, spatial = self.group_size, self.num_features, x.shape[2:]
        g = batch // n
        stacked = x.view(g, n, c, *spatial).transpose(0, 1).reshape(n, g * c, *spatial)
        running_mean = running_var = None
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean.repeat(g), self.running_var.repeat(g)
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        out = F.batch_norm(stacked, running_mean, running_var, weight, bias, True, factor, self.eps)
        if self.track_running_stats:  # each group's moved copy, averaged over the groups
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(g, c).mean(dim=0))
                self.running_var.copy_(running_var.view(g, c).mean(dim=0))
        out = out.view(n, g, c, *spatial).transpose(0, 1).reshape(x.shape)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _ghost_copy(bn: nn.BatchNorm2d, group_size: int) -> GhostBatchNorm2d:
    """A GhostBatchNorm2d with ``bn``'s hyperparameters, state, device, dtype and train/eval mode."""
    ghost = GhostBatchNorm2d(
        bn.num_features,
        group_size,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    ghost.load_state_dict(bn.state_dict())
    reference = next(iter(bn.state_dict().values()), None)
    if reference is not None:
        ghost.to(device=reference.device, dtype=reference.dtype)
    return ghost.train(bn.training)


def use_ghost_batch_norm(model: nn.Module, group_size: int) -> nn.Module:
    """Replace every BatchNorm2d of ``model`` in place by a GhostBatchNorm2d (state copied); 0 leaves it unchanged."""
    if group_size < 0:
        raise ConfigError(f"model.bn_group={group_size} is not valid: use 0 (whole batch) or a positive group size")
    if group_size == 0:
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, _ghost_copy(child, group_size))
    return model
