"""`make install TORCH=...`: the pip commands make would run (`make -n`, nothing installed), for each torch build, a
switch between builds, and a rerun that must not reinstall."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
INDEX = "https://download.pytorch.org/whl/"


def make_n(venv: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The commands `make -n ARGS` prints for a .venv at `venv`."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TORCH", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", *args, f"VENV={venv}"], cwd=REPO, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


def pip_lines(commands: list[str]) -> list[str]:
    """The pip commands among `commands`, but pip's own upgrade."""
    return [c for c in commands if "/bin/pip " in c and not c.endswith("--upgrade pip")]


def installed(venv: Path, build: str) -> Path:
    """A .venv whose stamp says `build` was installed (newer than pyproject.toml)."""
    venv.mkdir()
    (venv / ".installed").write_text(f"{build}\n")
    return venv


@pytest.mark.parametrize("build", ["cu126", "cu128", "cu130", "cpu"])
def test_torch_and_torchvision_come_from_one_index_in_one_call(build: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    pips = pip_lines(make_n(venv, "install", f"TORCH={build}"))
    assert pips == [
        f"{venv}/bin/pip uninstall -y torch torchvision",
        f'{venv}/bin/pip install --index-url {INDEX}{build} "torch>=2.4" "torchvision>=0.19"',
        f'{venv}/bin/pip install -e ".[dev,parallel,slurm]"',  # torch already satisfied: not replaced
    ]
    assert make_n(venv, "install", f"TORCH={build}")[-1] == f"echo {build} > {venv}/.installed"


def test_a_new_venv_gets_the_default_index_build(tmp_path: Path) -> None:
    """Without TORCH, torch comes from wherever pip installs from (PyPI, a mirror, an offline CI's wheel cache)."""
    venv = tmp_path / "venv"
    pips = pip_lines(make_n(venv, "install"))
    assert f'{venv}/bin/pip install "torch>=2.4" "torchvision>=0.19"' in pips and INDEX not in " ".join(pips)
    assert make_n(venv, "install")[-1] == f"echo pypi > {venv}/.installed"


def test_another_build_reinstalls_and_the_same_one_does_nothing(tmp_path: Path) -> None:
    venv = installed(tmp_path / "venv", "cpu")
    assert pip_lines(make_n(venv, "install")) == []  # the installed choice stays
    assert pip_lines(make_n(venv, "install", "TORCH=cpu")) == []
    assert make_n(venv, "test") == [f"{venv}/bin/pytest -q"]  # other targets never switch the build
    switch = pip_lines(make_n(venv, "install", "TORCH=cu128"))
    assert switch[:2] == [
        f"{venv}/bin/pip uninstall -y torch torchvision",
        f'{venv}/bin/pip install --index-url {INDEX}cu128 "torch>=2.4" "torchvision>=0.19"',
    ]
    assert pip_lines(make_n(venv, "install", env={"TORCH": "cu130"}))[1].startswith(
        f"{venv}/bin/pip install --index-url {INDEX}cu130 "
    )


def test_pyproject_changes_reinstall_the_package_but_keep_torch(tmp_path: Path) -> None:
    venv = installed(tmp_path / "venv", "cu128")
    stamp = venv / ".installed"
    old = (REPO / "pyproject.toml").stat().st_mtime - 3600
    os.utime(stamp, (old, old))
    pips = pip_lines(make_n(venv, "install"))
    assert not any("uninstall" in p for p in pips)
    assert f'{venv}/bin/pip install --index-url {INDEX}cu128 "torch>=2.4" "torchvision>=0.19"' in pips


def test_an_unknown_build_is_refused_naming_the_choices(tmp_path: Path) -> None:
    done = subprocess.run(["make", "-n", "install", "TORCH=cu999", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    assert "TORCH=cu999 is not valid: one of pypi cu126 cu128 cu130 cpu" in done.stderr
