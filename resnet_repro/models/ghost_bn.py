"""Ghost batch norm: BN statistics over fixed-size sub-batches (the paper's 64 images per GPU at batch 128)."""

import torch
from torch import nn

from resnet_repro.errors import ConfigError


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each consecutive group of ``group_size`` images on its own.

    Parameters, buffers and state_dict keys are those of BatchNorm2d. Running statistics move (with the usual
    momentum) toward the mean over groups of each group's mean and unbiased variance. In eval mode, or when
    ``group_size`` >= the batch size, it is exactly BatchNorm2d.
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
        # statistics in float32 even under autocast, like cuDNN's batch norm
        groups = x.float().view(batch // self.group_size, self.group_size, *x.shape[1:])
        dims = (1, 3, 4)
        mean = groups.mean(dim=dims, keepdim=True)
        var = groups.var(dim=dims, unbiased=False, keepdim=True)
        out = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.track_running_stats:
            self._update_running_stats(mean, var, groups[0].numel() // self.num_features)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Move running stats toward the group-averaged mean and unbiased variance (BatchNorm2d's momentum rule)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.mean(dim=0).flatten().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(dim=0).flatten().to(self.running_var.dtype), factor)

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
