"""Every experiment composes, keeps the paper's recipe, and its sweep expands to exactly the expected runs.

Expansion is checked twice: `resnet_repro.sweep.planned_runs` (what the sweep summary and `make reproduce` rely on)
must list the same jobs and directory names as Hydra itself composes for each job (`load_sweep_config`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import resnet_repro.train  # noqa: F401 - registers the schema and the resolvers, as `python -m` does
from resnet_repro import sweep
from resnet_repro.gpu_slots import local_jobs
from resnet_repro.results import NON_RECIPE_KEYS
from resnet_repro.run_dir import data_dir_name, run_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
PAPER = ("fig6_plain", "fig6_resnet", "fig6_deep", "table6", "shortcuts", "fig7", "fig7_110")
A = "A"

# experiment -> (its output directory under runs_dir, {(arch, depth, shortcut, seed)} of its runs)
EXPECTED: dict[str, tuple[str, set[tuple[str, int, str, int]]]] = {
    "fig6_plain": ("fig6_plain", {("plain", d, A, 0) for d in (20, 32, 44, 56)}),
    "fig6_resnet": ("fig6_resnet", {("resnet", d, A, 0) for d in (20, 32, 44, 56, 110)}),
    "fig6_deep": ("fig6_deep", {("resnet", 110, A, 0), ("resnet", 1202, A, 0)}),
    "table6": ("table6", {("resnet", d, A, s) for d, s in product((20, 32, 44, 56, 110), range(5))}),
    "shortcuts": ("shortcuts", {("resnet", d, s, 0) for d, s in product((20, 32, 44, 56), "ABC")}),
    "fig7": ("fig7", {(a, d, A, 0) for a, d in product(("plain", "resnet"), (20, 56))}),
    "fig7_110": ("fig7", {("resnet", 110, A, 0)}),
    "quick": ("quick", {(a, d, A, 0) for a, d in product(("plain", "resnet"), (20, 56))}),
    "smoke": ("smoke", {("resnet", 20, A, 0)}),
    "fig6_cpu": ("fig6_cpu", {(a, d, A, 0) for a, d in product(("plain", "resnet"), (20, 32, 44, 56))}),
}


@pytest.fixture(scope="module")
def loader() -> Iterator:
    """Hydra's config loader over configs/, as `python -m resnet_repro.train` uses it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()
    GlobalHydra.instance().clear()


def multirun_config(loader, overrides: list[str]) -> DictConfig:
    """The config of `python -m resnet_repro.train -m OVERRIDES` before the sweeper splits it."""
    return loader.load_configuration(config_name="train", overrides=overrides, run_mode=RunMode.MULTIRUN)


_EXPANDED: dict[tuple[str, ...], list[tuple[sweep.PlannedRun, DictConfig]]] = {}


def expand(loader, overrides: list[str]) -> list[tuple[sweep.PlannedRun, DictConfig]]:
    """Each planned job with the job config Hydra composes for it; checks the planned directory against Hydra's."""
    if tuple(overrides) not in _EXPANDED:
        _EXPANDED[tuple(overrides)] = _expand(loader, overrides)
    return _EXPANDED[tuple(overrides)]


def _expand(loader, overrides: list[str]) -> list[tuple[sweep.PlannedRun, DictConfig]]:
    master = multirun_config(loader, overrides)
    jobs = []
    for run in sweep.planned_runs(master):
        job = loader.load_sweep_config(master, run.overrides)
        assert run.name == run_name(job.hydra.job.override_dirname)
        data = data_dir_name(job.data.source, job.data.path, job.data.label)
        assert run.dir == Path(master.runs_dir) / data / job.experiment / run.name
        jobs.append((run, job))
    return jobs


def enum_value(value) -> str:
    """An Enum-typed config value as its plain string ('A', 'pixel_mean')."""
    return getattr(value, "value", value)


def key(job: DictConfig) -> tuple[str, int, str, int]:
    """(arch, depth, shortcut, seed) of a composed job."""
    return job.model.arch, job.model.depth, enum_value(job.model.shortcut), job.seed


def test_every_experiment_file_is_listed() -> None:
    assert set(EXPERIMENTS) == set(EXPECTED)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_expands_to_expected_runs(loader, experiment: str) -> None:
    first_line = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[0]
    assert first_line == "# @package _global_"
    jobs = expand(loader, [f"experiment={experiment}"])
    out_dir, runs = EXPECTED[experiment]
    assert sorted(key(job) for _, job in jobs) == sorted(runs)  # exactly these runs, each once
    assert {job.experiment for _, job in jobs} == {out_dir}
    assert len({run.dir for run, _ in jobs}) == len(jobs)  # one directory per run
    for run, job in jobs:
        assert run.dir.parent == Path("runs") / "cifar-10" / out_dir  # runs/<data>/<experiment>
        assert run.name != "default" or len(jobs) == 1
        task = OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])
        OmegaConf.to_object(task)  # validates against the schema (types, enums)


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiments_keep_the_recipe(loader, experiment: str) -> None:
    for _, job in expand(loader, [f"experiment={experiment}"]):
        o, d = job.optim, job.data
        assert (o.lr, o.momentum, o.weight_decay, o.gamma) == (0.1, 0.9, 1e-4, 0.1)
        assert list(o.milestones) == [32000, 48000] and o.max_iter == 64000
        assert o.warmup is None  # on exactly for depth >= 110 (config.warmup_enabled)
        assert (d.batch_size, d.val_split, d.augment, enum_value(d.normalize)) == (128, 0, True, "pixel_mean")
        assert job.model.bn_group == 0


def recipe(job: DictConfig) -> str:
    """A composed job's config without what does not change its computation (results.NON_RECIPE_KEYS)."""
    config = OmegaConf.to_container(OmegaConf.masked_copy(job, [k for k in job if k != "hydra"]), resolve=True)
    return json.dumps({k: v for k, v in config.items() if k not in NON_RECIPE_KEYS}, sort_keys=True, default=str)


def test_the_paper_profile_trains_every_configuration_of_the_paper_experiments_once(loader) -> None:
    """`make reproduce` (paper) leaves out the experiment files' copies of each other's runs, and nothing else:
    the same set of configurations as all seven paper experiments, each trained by exactly one job, every one
    recording Figure 7's responses."""
    from resnet_repro.reproduce import PROFILES

    wanted = {recipe(job) for e in PAPER for _, job in expand(loader, [f"experiment={e}"])}
    jobs = [job for e in PROFILES["paper"] for _, job in expand(loader, [f"experiment={e.name}", *e.overrides])]
    trained = [recipe(job) for job in jobs]
    assert len(trained) == len(set(trained)) == len(wanted) and set(trained) == wanted
    assert len(jobs) == 4 + 25 + 8 + 1 and all(job.responses for job in jobs)


def test_figure7_runs_compute_responses(loader) -> None:
    for experiment in ("fig7", "fig7_110"):
        assert all(job.responses for _, job in expand(loader, [f"experiment={experiment}"]))


def test_figure7_experiments_share_a_directory_without_collisions(loader) -> None:
    dirs = [run.dir for e in ("fig7", "fig7_110") for run, _ in expand(loader, [f"experiment={e}"])]
    assert len(dirs) == len(set(dirs)) == 5


def test_quick_is_a_shortened_schedule(loader) -> None:
    assert "SHORTENED" in (CONFIG_DIR / "experiment" / "quick.yaml").read_text()
    for _, job in expand(loader, ["experiment=quick"]):
        o = job.optim
        assert o.max_iter < 64000
        assert list(o.milestones) == [o.max_iter // 2, o.max_iter * 3 // 4]
        assert (o.momentum, o.weight_decay, o.gamma, job.data.batch_size) == (0.9, 1e-4, 0.1, 128)
        assert o.lr == 0.02 and o.warmup is None  # documented in quick.yaml: 0.1 blows ResNet-56 up at 200 iterations
        assert o.max_iter % job.trainer.eval_every == 0 and o.max_iter % job.trainer.log_every == 0


def test_command_line_sweep_replaces_the_experiment_values(loader) -> None:
    overrides = ["experiment=fig6_resnet", "model.depth=20,56", "model.shortcut=A,B"]
    jobs = expand(loader, overrides)
    assert sorted(key(job) for _, job in jobs) == sorted(("resnet", d, s, 0) for d, s in product((20, 56), "AB"))
    assert sorted(run.name for run, _ in jobs) == [
        f"model.depth={d},model.shortcut={s}" for d, s in product((20, 56), "AB")
    ]


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_sweeps_start_their_longest_runs_first(loader, experiment: str) -> None:
    """With several runs at once, the deepest runs (the longest) go first, so none starts when the rest are done."""
    depths = [job.model.depth for _, job in expand(loader, [f"experiment={experiment}"])]
    assert depths == sorted(depths, reverse=True)


def test_data_location_and_label_stay_out_of_directory_names(loader) -> None:
    overrides = ["experiment=fig6_plain", "data=npz", "data.path=/x/y.npz", 'data.label="a, b (c)"']
    names = [run.name for run, _ in expand(loader, overrides)]
    assert names == [f"data=npz,model.depth={d}" for d in (56, 44, 32, 20)]  # deepest first (fig6_plain.yaml)


def test_speed_only_trainer_keys_keep_the_run_directories(loader) -> None:
    """Adding trainer.cuda_graphs / trainer.compile to a sweep resumes and skips the same runs, not new ones."""
    plain = ["experiment=fig6_resnet", "model.depth=20,56"]
    names = [run.name for run, _ in expand(loader, plain)]
    fast = [run.name for run, _ in expand(loader, [*plain, "trainer.cuda_graphs=true", "trainer.compile=true"])]
    assert fast == names == ["model.depth=20", "model.depth=56"]
    assert [run.name for run, _ in expand(loader, [*plain, "trainer.precision=fp32"])] != names  # numbers change


def test_launchers_compose(loader, monkeypatch: pytest.MonkeyPatch) -> None:
    local = multirun_config(loader, ["experiment=quick", "hydra/launcher=local"])
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")
    assert local.hydra.launcher.n_jobs == local_jobs()
    slurm = multirun_config(
        loader,
        ["experiment=quick", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
         "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=4", "hydra.launcher.mem_gb=16",
         "hydra.launcher.array_parallelism=3"],
    )
    s = slurm.hydra.launcher
    assert s._target_.endswith("SlurmLauncher")
    assert (s.partition, s.timeout_min, s.gpus_per_node, s.cpus_per_task, s.mem_gb, s.array_parallelism) == (
        "gpu", 30, 2, 4, 16, 3)
    assert multirun_config(loader, ["hydra/launcher=submitit_local"]).hydra.launcher._target_.endswith("LocalLauncher")


def test_a_run_name_too_long_for_a_file_name_is_cut_and_hashed(tmp_path: Path) -> None:
    """Many overrides (e.g. a short schedule with its intervals) once made a name the file system refused."""
    overrides = ",".join(f"optim.warmup_window={i},trainer.log_every={i},trainer.eval_every={i}" for i in range(9))
    name = run_name(overrides)
    assert len(overrides) > 255 and len(name.encode()) == 255 and name.startswith(overrides[:200])
    assert name == run_name(overrides) != run_name(overrides.replace("=8", "=9"))
    (tmp_path / name).mkdir()  # a name the file system takes
    assert run_name("model.depth=56,model=plain") == "model.depth=56,model=plain"
    assert run_name("") == "default"
