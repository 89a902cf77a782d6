"""Hydra entry point: compose, validate, build, `engine.fit`, write metrics.json. Thin on purpose.

python -m resnet_repro.train model=plain model.depth=56
python -m resnet_repro.train -m experiment=fig6_resnet model.depth=20,56
torchrun --nproc-per-node=2 -m resnet_repro.train model.depth=110
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from resnet_repro.checkpoint import config_fingerprint, remove_stale_temp_files
from resnet_repro.config import (
    DataSource,
    Device,
    Precision,
    TrainConfig,
    check_batch_fits,
    register_configs,
    to_train_config,
    validate,
    warmup_enabled,
)
from resnet_repro.data import DeviceData, ImageArrays, load_cifar10, load_npz, split_validation
from resnet_repro.device import (
    check_device_options,
    device_type,
    init_distributed,
    job_device,
    resolve_channels_last,
    resolve_precision,
)
from resnet_repro.engine import DistInfo, TrainingRun, fit, write_metrics
from resnet_repro.gpu_slots import local_jobs
from resnet_repro.models import build_model, count_parameters
from resnet_repro.models.ghost_bn import use_ghost_batch_norm
from resnet_repro.optim import Schedule, Warmup, make_sgd
from resnet_repro.run_dir import (
    EXIT_CONFIG_ERROR,
    METRICS_NAME,
    data_dir_name,
    hydra_subdir,
    own_run_directory,
    run_log,
    run_name,
)
from resnet_repro.tracking import environment_info

log = logging.getLogger("resnet_repro.train")

# Absolute, so the console script and in-process calls find the configs too (a relative path would be resolved
# against the package `resnet_repro` when the module is not run as __main__).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


register_configs()
for _name, _resolver in (
    ("run_name", run_name),
    ("data_dir", data_dir_name),
    ("hydra_subdir", hydra_subdir),
    ("run_log", run_log),
    ("local_jobs", local_jobs),  # n_jobs of configs/hydra/launcher/local.yaml
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def distributed_info() -> DistInfo:
    """Rank/world size from torchrun's environment (1 process otherwise)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))


def load_data(cfg: TrainConfig) -> ImageArrays:
    """Load the configured images once, as uint8 CPU tensors."""
    d = cfg.data
    if DataSource(d.source) is DataSource.npz:
        arrays = load_npz(d.path, d.label, cfg.model.num_classes)
    else:
        arrays = load_cifar10(d.root)
    if d.label:
        arrays.label = d.label
    return arrays


def train(cfg: TrainConfig, run_dir: Path, dist_info: DistInfo, sweeping: bool = False) -> dict[str, Any]:
    """Validate, take this job's device (and join torchrun's process group), build everything and fit one run in
    `run_dir`; returns the metrics written to metrics.json."""
    kind = device_type(Device(cfg.trainer.device))
    validate(cfg, world_size=dist_info.world_size)  # before peers are waited for
    check_device_options(cfg.trainer, kind, dist_info.world_size)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    with job_device(kind, dist_info.world_size, sweeping) as device:
        if dist_info.world_size > 1 and not torch.distributed.is_initialized():
            init_distributed(device)
        return _train_on(cfg, run_dir, dist_info, device)


def _train_on(cfg: TrainConfig, run_dir: Path, dist_info: DistInfo, device: torch.device) -> dict[str, Any]:
    """Load the data, build the model, optimizer and schedule on `device`, fit, and write metrics.json (rank 0)."""
    precision = resolve_precision(Precision(cfg.trainer.precision), device)
    channels_last = resolve_channels_last(cfg.trainer.channels_last, device)
    env = environment_info(device)
    log.info(
        "run dir %s | torch %s CUDA %s cuDNN %s | device %s | threads %d | git %s",
        run_dir,
        *(env[key] for key in ("torch", "cuda", "cudnn", "device", "threads", "git_sha")),
    )
    for directory in (run_dir, run_dir / "checkpoints"):  # temp files of atomic writes killed halfway
        remove_stale_temp_files(directory)

    arrays = load_data(cfg)
    train_arrays, val_arrays = split_validation(arrays, cfg.data.val_split, cfg.seed)
    check_batch_fits(cfg.data.batch_size, len(train_arrays.y_train))
    data = DeviceData(train_arrays, val_arrays, device, cfg.data.normalize.value, cfg.data.augment, cfg.seed)
    data_sha256, n_test = arrays.sha256(), len(arrays.y_test)
    n_val = 0 if val_arrays is None else len(val_arrays.y_train)
    log.info(
        "data: %s (sha256 %s) | train %d, val %d, test %d", arrays.label, data_sha256[:12], data.n_train, n_val, n_test
    )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.model.depth, cfg.model.shortcut.value, cfg.model.num_classes)
    use_ghost_batch_norm(model, cfg.model.bn_group)
    params = count_parameters(model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = make_sgd(model, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, fused=True)
    o = cfg.optim
    warmup = None
    if warmup_enabled(o, cfg.model.depth):
        warmup = Warmup(
            lr=o.warmup_lr, until_err=o.warmup_until_err, window=o.warmup_window, max_iter=o.warmup_max_iter
        )
    schedule = Schedule(o.lr, list(o.milestones), o.gamma, warmup)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.trainer.compile:
        model = torch.compile(model)

    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    run_info = {
        "arch": cfg.model.arch,
        "depth": cfg.model.depth,
        "shortcut": cfg.model.shortcut.value,
        "seed": cfg.seed,
        "experiment": cfg.experiment,
        "params": params,
        "device": env["device"],
        "versions": env,
        "precision": precision.value,
        "world_size": dist_info.world_size,
        "config": config_dict,
        "data": {
            "name": cfg.data.source.value,
            "path": cfg.data.path,
            "label": arrays.label,
            "sha256": data_sha256,
            "n_train": data.n_train,
            "n_val": n_val,
            "n_test": n_test,
        },
    }
    log.info(
        "model %s-%s shortcut %s: %d parameters | precision %s | warm-up %s",
        cfg.model.arch,
        cfg.model.depth,
        cfg.model.shortcut.value,
        params,
        precision.value,
        "on" if warmup else "off",
    )
    identity, fingerprint = {"data_sha256": data_sha256, "precision": precision.value}, config_fingerprint(config_dict)
    run = TrainingRun(model, optimizer, schedule, data, run_dir, cfg, precision.value, fingerprint, identity, dist_info)
    metrics = fit(run, run_info)
    if dist_info.is_main:
        write_metrics(run_dir, metrics)
        log.info(
            "finished: test err %.2f%% train err %.2f%% in %.0f s -> %s",
            metrics["final_test_err"],
            metrics["final_train_err"],
            metrics["wall_time_s"],
            run_dir / METRICS_NAME,
        )
    return metrics


def _silence_other_ranks(dist_info: DistInfo) -> None:
    """Under torchrun, rank 0 alone writes train.log and the console's progress; the other ranks print only
    warnings and errors (each rank's own, e.g. a rank that fails)."""
    if not dist_info.is_main:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
            else:
                handler.setLevel(logging.WARNING)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(dict_cfg: DictConfig) -> str:
    """Run one job; returns 'finished', 'skipped', 'busy' (another process trains its directory) or 'failed'.
    In a sweep a failure never raises."""
    global _job_started
    _job_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    dist_info = distributed_info()
    _silence_other_ranks(dist_info)
    try:
        return own_run_directory(
            lambda: train(to_train_config(dict_cfg), run_dir, dist_info, sweeping),
            run_dir,
            dist_info.rank,
            dist_info.world_size,
            sweeping,
        )
    finally:  # leave torchrun's process group, if this job joined one
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_job_started = False  # set when Hydra hands `main` a composed config


def cli() -> None:
    """`main`, except that a command line Hydra itself rejects (unknown key, wrong type) exits 2 like our checks."""
    global _job_started
    _job_started = False
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and not _job_started:
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        raise


if __name__ == "__main__":
    cli()
