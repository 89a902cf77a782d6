"""Figure 7 of the paper: standard deviations of the 3x3 layers' responses (after BN, before ReLU/addition)."""

import torch
from torch import nn

from resnet_repro.errors import ConfigError
from resnet_repro.models.cifar_resnet import CifarResNet

FIGURE7_ARCHS = ("plain", "resnet")


def response_modules(model: nn.Module) -> list[nn.Module]:
    """The BN modules right after each 3x3 conv (stem, then both of every block), in forward order."""
    arch = getattr(model, "arch", type(model).__name__)
    if not isinstance(model, CifarResNet) or arch not in FIGURE7_ARCHS:
        raise ConfigError(f"Figure 7 is defined for model.arch in {', '.join(FIGURE7_ARCHS)}; got model.arch={arch}")
    modules: list[nn.Module] = [model.bn1]
    for stage in model.stages:
        for block in stage:
            modules += [block.bn1, block.bn2]
    return modules


@torch.no_grad()
def layer_response_std(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Per-layer response std over a set of images, in forward order (the paper's Figure 7).

    For layer l with BN outputs y (all N images, all C channels, all H x W positions, eval-mode BN), the value
    is the population standard deviation of the N*C*H*W numbers: sqrt(mean(y^2) - mean(y)^2), accumulated in
    float64 over batches of ``batch_size``. ``images`` are already normalised, N x 3 x 32 x 32. The model is run
    in eval mode and put back into its previous mode afterwards.
    """
    modules = response_modules(model)
    sums = torch.zeros(len(modules), dtype=torch.float64)
    squares = torch.zeros(len(modules), dtype=torch.float64)
    counts = [0] * len(modules)

    def hook_for(index: int):
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            values = output.detach().double()
            sums[index] += values.sum().cpu()
            squares[index] += values.square().sum().cpu()
            counts[index] += values.numel()

        return hook

    handles = [module.register_forward_hook(hook_for(index)) for index, module in enumerate(modules)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    count = torch.tensor(counts, dtype=torch.float64)
    means = sums / count
    return (squares / count - means.square()).clamp_min(0).sqrt().tolist()
