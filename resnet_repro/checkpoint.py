"""Atomic checkpoints that load with `torch.load(weights_only=True)`, checked against the run's config."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from resnet_repro.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once: mkstemp's files are 0600, the files we publish get the usual mode
REQUIRED_KEYS = ("config_fingerprint", "model", "optimizer", "rng", "run_state")
# Keys that may change between a run and its resumption without changing the run's results.
RESUME_NEUTRAL_KEYS = ("trainer", "data.root", "data.path", "data.label", "runs_dir")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators' states a checkpoint keeps: the CPU generator's and, on CUDA, the run device's only (the
    other GPUs' generators are not the run's, and a resumed run may land on another index, e.g. a sweep slot,
    or on a machine with fewer GPUs)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Put `rng_state`'s states back: the CPU generator's, and the CUDA one onto `device` when both are CUDA."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda") if device.type == "cuda" else None
    if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12-01 kept every GPU's state, by index
        index = device.index or 0
        log.warning("checkpoint from before 2026-12-01: restoring its CUDA generator state of GPU %d", index)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config minus keys that do not change results: two runs resume each other only if equal."""
    cleaned = json.loads(json.dumps(config, sort_keys=True, default=str))
    for dotted in RESUME_NEUTRAL_KEYS:  # top-level keys and keys of a section
        section, _, leaf = dotted.rpartition(".")
        (cleaned.get(section, {}) if section else cleaned).pop(leaf, None)
    return hashlib.sha256(json.dumps(cleaned, sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that readers see the old version or the new one, never a partial one: `write(f)` fills a temp
    file in the same directory, which is fsynced and renamed over `path`, then the directory is fsynced. A failure
    leaves `path` untouched and removes the temp file (after a SIGKILL, `remove_stale_temp_files` at the next start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files left by an interrupted atomic write; returns how many were removed."""
    stale = list(directory.glob(".*.tmp"))  # none in a directory that does not exist
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale temp file(s) in %s", len(stale), directory)
    return len(stale)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically save a checkpoint (plain tensors, numbers, strings, lists and dicts only)."""
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def _load_error_reason(exc: Exception) -> str:
    """torch.load's error in one line, without its advice to retry with weights_only=False (never for our files)."""
    text = " ".join(str(exc).split())
    if "central directory" in text:
        return "truncated or corrupt (its zip archive has no central directory)"
    if text.startswith("Weights only load failed"):
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        detail = detail.split(" Check the documentation")[0].split("trusted source.")[-1].strip()
        return f"not a checkpoint of plain tensors (torch.load with weights_only=True refused it: {detail[:160]})"
    return f"{type(exc).__name__}: {text[:200]}"


def load_checkpoint(
    path: Path, fingerprint: str, model: torch.nn.Module, identity: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Load and check a checkpoint for this run; any problem raises ConfigError naming the file and the fix.

    `identity` (e.g. {"data_sha256": ..., "precision": "bf16"}) is what the run computes on and with, beyond its
    config: a checkpoint written on other data or in other arithmetic is refused, naming the key that differs."""

    def refused(problem: str) -> ConfigError:
        fix = f"to start this run over, delete {path} (or the whole run directory {path.parent.parent})"
        return ConfigError(f"checkpoint {path} {problem}; {fix}")

    size = path.stat().st_size
    if size == 0:
        raise refused("is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise refused(f"({size} bytes) cannot be read: {_load_error_reason(exc)}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise refused(f"is not a resnet_repro checkpoint (format {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise refused(f"is incomplete (missing {', '.join(missing)})")
    saved_identity = state.get("identity", {})
    for key, value in (identity or {}).items():
        if saved_identity.get(key) != value:
            raise refused(
                f"was written with {key}={saved_identity.get(key, 'unrecorded')!r}, this run has {key}={value!r} "
                "(other data or other numerics would mix two runs in one)"
            )
    if state["config_fingerprint"] != fingerprint:
        hashes = f"{str(state['config_fingerprint'])[:12]} != {fingerprint[:12]}"
        raise refused(f"was written by a different configuration (config hash {hashes} of this run)")
    expected, saved = model.state_dict(), state["model"]
    if set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items()):
        raise refused("holds a different architecture than model.arch/model.depth")
    return state
