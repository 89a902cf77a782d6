"""Every config and group option composes; the schema rejects bad types, unknown keys and bad ranges by name."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import resnet_repro.train  # noqa: F401  (registers the schema and the run_name resolver)
from resnet_repro.config import TrainConfig, to_train_config, validate, warmup_enabled
from resnet_repro.errors import ConfigError
from resnet_repro.models import build_model, count_parameters

CONFIGS = str(REPO / "configs")
GROUP_OPTIONS = {
    "model": ["plain", "resnet", "preact", "bottleneck", "resnet18"],
    "data": ["cifar10", "npz"],
}


def compose_train(overrides: list[str]) -> TrainConfig:
    """Compose configs/train.yaml with overrides into a typed TrainConfig."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return to_train_config(cfg)


def test_default_config_is_the_paper_recipe():
    cfg = compose_train([])
    assert (cfg.model.arch, cfg.model.depth, cfg.model.shortcut.value) == ("resnet", 20, "A")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert list(cfg.optim.milestones) == [32000, 48000] and cfg.optim.max_iter == 64000
    assert cfg.data.batch_size == 128 and cfg.data.augment and cfg.data.normalize.value == "pixel_mean"
    assert cfg.data.val_split == 0 and cfg.optim.warmup is None


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option, sample_npz):
    overrides = [f"{group}={option}"]
    if option == "npz":
        overrides.append(f"data.path={sample_npz}")
    cfg = compose_train(overrides)
    validate(cfg)
    if group == "model":
        assert cfg.model.arch == option
        model = build_model(cfg.model.arch, cfg.model.depth, cfg.model.shortcut.value)
        assert count_parameters(model) > 0


def test_warmup_rule_follows_the_paper():
    cfg = compose_train([])
    assert not warmup_enabled(cfg.optim, 56)
    assert warmup_enabled(cfg.optim, 110) and warmup_enabled(cfg.optim, 1202)
    assert not warmup_enabled(dataclasses.replace(cfg.optim, warmup=False), 110)
    assert warmup_enabled(dataclasses.replace(cfg.optim, warmup=True), 20)


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("model.depth=abc", "model.depth", "Integer"),
        ("model.shortcut=D", "model.shortcut", r"\[A, B, C\]"),
        ("data.normalize=imagenet", "data.normalize", r"\[pixel_mean, channel\]"),
        ("optim.lr=fast", "optim.lr", "Float"),
        ("model.widht=2", "model.widht", "not in .ModelConfig."),
    ],
)
def test_schema_rejects_bad_types_and_unknown_keys(override, key, allowed):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    cause = str(info.value.__cause__)
    assert f"full_key: {key}" in cause
    assert re.search(allowed, cause)


def test_added_unknown_key_is_rejected_not_dropped():
    with pytest.raises(ConfigError, match=r"model\.width is not a config key; valid keys here: arch, bn_group"):
        compose_train(["+model.width=2"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.depth=21"], "model.depth"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["optim.milestones=[48000,32000]"], "optim.milestones"),
        (["optim.milestones=[32000,70000]"], "optim.milestones"),
        (["optim.momentum=1.5"], "optim.momentum"),
        (["data.batch_size=0"], "data.batch_size"),
        (["model.bn_group=48"], "model.bn_group"),
        (["data=npz", "data.path=/nonexistent/file.npz"], "data.path"),
        (["trainer.eval_every=0"], "trainer.eval_every"),
    ],
)
def test_validate_names_the_key(overrides, key):
    cfg = compose_train(overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_batch_must_divide_over_processes():
    cfg = compose_train(["data.batch_size=129"])
    with pytest.raises(ConfigError, match=r"data\.batch_size.*divisible by the number of processes \(2\)"):
        validate(cfg, world_size=2)


def test_bad_depth_message_lists_nearest_valid_depths():
    cfg = compose_train(["model.depth=21"])
    with pytest.raises(ConfigError, match=r"20.*26"):
        validate(cfg)
