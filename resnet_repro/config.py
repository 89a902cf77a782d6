"""Typed configuration schema (Hydra ConfigStore) and the checks that run before anything is built.

Every key is documented where it is declared, with units and the paper section it comes from
("paper" = He et al. 2015, Deep Residual Learning for Image Recognition, section 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from resnet_repro.errors import ConfigError


class Shortcut(str, Enum):
    """Shortcut options of the paper (section 3.3): A zero-pad identity, B projection where shape changes, C always."""

    A = "A"
    B = "B"
    C = "C"


class Normalize(str, Enum):
    """Input normalisation: the paper's per-pixel mean subtraction, or per-channel mean/std."""

    pixel_mean = "pixel_mean"
    channel = "channel"


class Precision(str, Enum):
    """Arithmetic precision of the forward/backward pass; `auto` = bf16 on CUDA, fp32 on CPU."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Device(str, Enum):
    """Where to train; `auto` picks CUDA when available."""

    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class DataSource(str, Enum):
    """Where images come from: torchvision's CIFAR-10 download, or a local npz file."""

    cifar10 = "cifar10"
    npz = "npz"


@dataclass
class ModelConfig:
    """The network (paper section 4.2, Table 6)."""

    arch: str = "resnet"  # plain | resnet | preact | bottleneck | resnet18
    depth: int | None = 20  # plain/resnet/preact: 6n+2; bottleneck: 9n+2; resnet18: null
    shortcut: Shortcut = Shortcut.A  # paper uses A on CIFAR (section 4.2); B/C for the shortcut study
    num_classes: int = 10
    bn_group: int = 0  # ghost-BN sub-batch in images; 0 = whole per-GPU batch; 64 = paper's 2-GPU statistics


@dataclass
class DataConfig:
    """The data set, split and augmentation (paper section 4.2)."""

    source: DataSource = DataSource.cifar10
    root: str = "./data"  # torchvision download directory (source=cifar10)
    path: str | None = None  # npz file with x_train,y_train,x_test,y_test (source=npz)
    label: str | None = None  # human label for results, e.g. "CIFAR-10 (JPEG re-encoded)"; default from source
    batch_size: int = 128  # global minibatch in images (paper: 128, split over two GPUs)
    val_split: int = 0  # images held out of training for validation; paper: 5000 to choose the schedule, 0 final
    augment: bool = True  # pad 4 px, random 32x32 crop, random horizontal flip (paper)
    normalize: Normalize = Normalize.pixel_mean  # paper: per-pixel mean subtracted, from the training images only
    eval_batch_size: int = 1000  # images per forward pass at evaluation time (no effect on results)


@dataclass
class OptimConfig:
    """SGD and the iteration-based learning-rate schedule (paper section 4.2)."""

    lr: float = 0.1  # initial learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4  # applied to every parameter, as in the paper's Caffe setup
    milestones: list[int] = field(default_factory=lambda: [32000, 48000])  # iterations where lr is multiplied by gamma
    gamma: float = 0.1  # lr factor at each milestone
    max_iter: int = 64000  # iterations (not epochs): 64k at batch 128 is about 164 epochs
    warmup: bool | None = None  # paper: on for ResNet-110/1202; null = on when depth >= 110
    warmup_lr: float = 0.01  # lr during warm-up
    warmup_until_err: float = 80.0  # warm-up ends once the training error (%) drops below this
    warmup_window: int = 50  # training error is the mean over this many most recent minibatches
    warmup_max_iter: int = 2000  # give up on the warm-up here (with a warning) and go to lr


@dataclass
class TrainerConfig:
    """How the loop runs: device, precision, intervals. None of these change the recipe."""

    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: bool | None = None  # null = on for CUDA
    compile: bool = False  # torch.compile the model
    # Capture the whole iteration (augmentation, forward, backward, fused SGD, sums) in one CUDA graph and replay
    # it (resnet_repro/step.py): removes the per-kernel launch cost. CUDA only, one process, not with fp16.
    cuda_graphs: bool = False
    log_every: int = 100  # iterations between training-error/loss log points (and host syncs)
    eval_every: int = 2000  # iterations between test (and val) evaluations; always at the end too
    checkpoint_every: int = 2000  # iterations between checkpoints; always at the end too
    progress: bool = True  # progress bar on stderr
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default


@dataclass
class TrainConfig:
    """Top-level configuration of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # seeds init, data order and augmentation; results are mean+-std over seeds
    experiment: str = "default"  # name of the experiment; runs go to runs/<data>/<experiment>/<overrides>
    runs_dir: str = "runs"  # root of all run directories
    responses: bool = True  # compute Figure-7 layer-response std at the end (plain/resnet only)


def register_configs() -> None:
    """Register the schema so `configs/train.yaml` can name it in its defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as a typed TrainConfig; keys the schema does not declare are an error (not dropped)."""
    sections = [(cfg, TrainConfig, "")]
    for node, schema, prefix in sections:  # grows as it goes: each section's subsections are checked after it
        declared = {f.name: f.default_factory for f in fields(schema)}
        for key in (k for k in node if k != "hydra"):
            if key not in declared:
                raise ConfigError(f"{prefix}{key} is not a config key; valid keys here: {', '.join(sorted(declared))}")
            if is_dataclass(declared[key]):
                sections.append((node[key], declared[key], f"{prefix}{key}."))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Unless `ok`, raise ConfigError "`key`=`value` is not allowed: `allowed`"."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check ranges and combinations; raise ConfigError naming the full key. Builds nothing. What the device
    decides (fp16, CUDA graphs) is checked by device.check_device_options."""
    from resnet_repro.models import validate_model_args

    validate_model_args(cfg.model.arch, cfg.model.depth, str(Shortcut(cfg.model.shortcut).value))
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    require(m.num_classes >= 2, "model.num_classes", m.num_classes, "an integer >= 2")
    require(d.batch_size >= 1, "data.batch_size", d.batch_size, "a positive integer (paper: 128)")
    per_rank, rest = divmod(d.batch_size, world_size)
    divisible = (
        f"must be divisible by the number of processes ({world_size}); use e.g. {128 // world_size * world_size}"
    )
    require(rest == 0, "data.batch_size", d.batch_size, divisible)
    require(m.bn_group >= 0, "model.bn_group", m.bn_group, "0 (whole batch) or a positive divisor of the batch")
    divides = f"must divide the per-process batch {per_rank} (data.batch_size / processes); e.g. 64 for batch 128"
    require(not m.bn_group or per_rank % m.bn_group == 0, "model.bn_group", m.bn_group, divides)
    require(d.val_split >= 0, "data.val_split", d.val_split, "0 or a positive number of images (paper: 5000)")
    require(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "a positive integer")
    if DataSource(d.source) is DataSource.npz:
        require(d.path is not None, "data.path", d.path, "data=npz needs data.path=FILE.npz")
        require(Path(d.path).is_file(), "data.path", d.path, "file not found; give an existing .npz file")
    require(o.lr > 0, "optim.lr", o.lr, "a positive number (paper: 0.1)")
    require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "a number in [0, 1) (paper: 0.9)")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a non-negative number (paper: 1e-4)")
    require(0 < o.gamma <= 1, "optim.gamma", o.gamma, "a number in (0, 1] (paper: 0.1)")
    require(o.max_iter >= 1, "optim.max_iter", o.max_iter, "a positive number of iterations (paper: 64000)")
    ms, increasing = list(o.milestones), "strictly increasing iterations, e.g. [32000,48000]"
    require(all(a < b for a, b in zip(ms, ms[1:])), "optim.milestones", ms, increasing)
    # The paper's milestones (32k, 48k of 64k: 50%, 75%) scaled to max_iter; one too short for two distinct gets fewer.
    paper = ",".join(str(x) for x in sorted({o.max_iter // 2, o.max_iter * 3 // 4}) if x > 0)
    within = (
        f"each milestone must lie in (0, optim.max_iter={o.max_iter}); with optim.max_iter={o.max_iter} also set "
        f"optim.milestones=[{paper}] (the paper's shape: lr / 10 at 50% and 75% of max_iter)"
    )
    require(all(0 < x < o.max_iter for x in ms), "optim.milestones", ms, within)
    require(o.warmup_lr > 0, "optim.warmup_lr", o.warmup_lr, "a positive number (paper: 0.01)")
    require(0 < o.warmup_until_err <= 100, "optim.warmup_until_err", o.warmup_until_err, "a percentage in (0, 100]")
    require(o.warmup_window >= 1, "optim.warmup_window", o.warmup_window, "a positive number of minibatches")
    require(o.warmup_max_iter >= 1, "optim.warmup_max_iter", o.warmup_max_iter, "a positive number of iterations")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        require(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "a positive number of iterations")
    require(t.threads >= 0, "trainer.threads", t.threads, "0 (torch default) or a positive thread count")


def check_batch_fits(batch_size: int, n_train: int) -> None:
    """Refuse a batch larger than the training split, whose size is known once the data is loaded."""
    require(batch_size <= n_train, "data.batch_size", batch_size, f"at most the {n_train} images of the training split")


def warmup_enabled(optim: OptimConfig, depth: int | None) -> bool:
    """The paper warms up ResNet-110 and 1202; `optim.warmup=null` means exactly that rule."""
    return depth is not None and depth >= 110 if optim.warmup is None else bool(optim.warmup)
