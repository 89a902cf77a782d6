"""Model registry: architecture name -> constructor with plain keyword arguments, plus argument validation."""

import logging
from collections.abc import Callable

from torch import nn

from resnet_repro.errors import ConfigError
from resnet_repro.models.cifar_resnet import paper_resnet, resnet18
from resnet_repro.models.preact import preact_bottleneck, preact_resnet

logger = logging.getLogger(__name__)

# name -> builder(depth, shortcut, num_classes); plain ignores the shortcut, bottleneck and resnet18 always
# project where the shape changes (their shortcut argument is validated but has no effect).
_BUILDERS: dict[str, Callable[[int | None, str, int], nn.Module]] = {
    "plain": lambda depth, shortcut, num_classes: paper_resnet(depth, False, shortcut, num_classes),
    "resnet": lambda depth, shortcut, num_classes: paper_resnet(depth, True, shortcut, num_classes),
    "preact": lambda depth, shortcut, num_classes: preact_resnet(depth, shortcut, num_classes),
    "bottleneck": lambda depth, shortcut, num_classes: preact_bottleneck(depth, num_classes),
    "resnet18": lambda depth, shortcut, num_classes: resnet18(num_classes),
}
ARCHS: tuple[str, ...] = tuple(_BUILDERS)

# depth = step * n + 2 with n >= 1 (each block adds `step` weighted layers; +2 for the stem conv and the FC)
_DEPTH_STEP = {"plain": 6, "resnet": 6, "preact": 6, "bottleneck": 9}
_SHORTCUTS = {"preact": ("A", "B")}  # arch -> allowed shortcuts; default below
_DEFAULT_SHORTCUTS = ("A", "B", "C")
_RESNET18_DEPTH = 18


def _nearest_depths(depth: int, step: int) -> list[int]:
    """The valid depths step*n+2 (n >= 1) just below and just above ``depth``."""
    below = (depth - 2) // step
    return sorted({step * max(n, 1) + 2 for n in (below, below + 1)})


def _validate_depth(arch: str, depth: object) -> None:
    """Raise ConfigError unless ``depth`` is valid for ``arch``."""
    if arch == "resnet18":
        if depth not in (None, _RESNET18_DEPTH):
            raise ConfigError(f"model.depth={depth} is not valid for model.arch=resnet18: depth must be 18 or null")
        return
    step = _DEPTH_STEP[arch]
    rule = f"depth must be {step}n+2 (n>=1)"
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ConfigError(f"model.depth={depth!r} is not valid for model.arch={arch}: {rule}, e.g. {step * 3 + 2}")
    if depth < step + 2 or (depth - 2) % step:
        nearest = ", ".join(str(d) for d in _nearest_depths(depth, step))
        raise ConfigError(
            f"model.depth={depth} is not valid for model.arch={arch}: {rule}; nearest valid depths: {nearest}"
        )


def validate_model_args(arch: str, depth: int | None, shortcut: str) -> None:
    """Raise ConfigError naming the config key and the valid values if (arch, depth, shortcut) cannot be built."""
    if arch not in _BUILDERS:
        raise ConfigError(f"model.arch={arch!r} is not valid: allowed values: {', '.join(ARCHS)}")
    _validate_depth(arch, depth)
    allowed = _SHORTCUTS.get(arch, _DEFAULT_SHORTCUTS)
    if shortcut not in allowed:
        raise ConfigError(
            f"model.shortcut={shortcut!r} is not valid for model.arch={arch}: allowed values: {', '.join(allowed)}"
        )


def build_model(arch: str, depth: int | None = None, shortcut: str = "A", num_classes: int = 10) -> nn.Module:
    """Validate the arguments and build the named architecture with He initialisation."""
    validate_model_args(arch, depth, shortcut)
    model = _BUILDERS[arch](depth, shortcut, num_classes)
    logger.info("built %s depth=%s shortcut=%s: %s parameters", arch, depth, shortcut, f"{count_parameters(model):,}")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
