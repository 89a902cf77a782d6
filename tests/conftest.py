"""Shared fixtures: the real CIFAR-10 sample, pinned thread counts, a tiny training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The 6,102-image sample beside the checkout; RESNET_REPRO_SAMPLE_NPZ points elsewhere (a GPU machine's .device/).
DEFAULT_SAMPLE_NPZ = REPO.parent / "shared" / "data" / "cifar10-sample" / "cifar10_sample.npz"
SAMPLE_NPZ = Path(os.environ.get("RESNET_REPRO_SAMPLE_NPZ") or DEFAULT_SAMPLE_NPZ)

torch.set_num_threads(int(os.environ.get("RESNET_REPRO_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def sample_npz() -> Path:
    """The 6,102 genuine CIFAR-10 images (SAMPLE_NPZ); required in CI, skipped elsewhere."""
    if not SAMPLE_NPZ.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the CIFAR-10 sample at {SAMPLE_NPZ}")
        pytest.skip(f"CIFAR-10 sample not found at {SAMPLE_NPZ}")
    return SAMPLE_NPZ


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_npz: Path) -> dict[str, object]:
    """The uninterrupted canonical run of the reliability tests (computed once per session; reliability_support)."""
    from reliability_support import reference_run

    return reference_run(tmp_path_factory, sample_npz)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node Slurm for the session (tests/slurm_cluster.py), with SLURM_CONF pointing at it while
    the session runs; every daemon is stopped at the end, also after a failed test. Needs root and Debian's
    slurmctld, slurmd, slurm-client and munge: skipped without them (in CI: a failure)."""
    from slurm_cluster import SlurmCluster, missing

    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the private Slurm cluster: {why}")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
