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
    if device.type == "cuda" and "cuda" in state:
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12-01 kept every GPU's state, by index
            index = device.index or 0
            log.warning("checkpoint from before 2026-12-01: restoring its CUDA generator state of GPU %d", index)
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config minus keys that do not change results: two runs resume each other only if equal."""
    cleaned = json.loads(json.dumps(config, sort_keys=True, default=str))
    for dotted in RESUME_NEUTRAL_KEYS:
        *parents, leaf = dotted.split(".")
        node = cleaned
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(cleaned, sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that readers see the old version or the new one, never a partial one.

    `write(f)` writes into a temp file in the same directory; it is flushed, fsynced and renamed over `path`,
    and the directory is fsynced. A failure at any point leaves `path` untouched and removes the temp file
    (a SIGKILL leaves the temp file behind: `remove_stale_temp_files` deletes it at the next start).
    """
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
    atomic_write_bytes(
        path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
    )


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files left by an interrupted atomic write; returns how many were removed."""
    stale = list(directory.glob(".*.tmp")) if directory.is_dir() else []
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
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        detail = detail.split(" Check the documentation")[0].split("trusted source.")[-1].strip()
        return f"not a checkpoint of plain tensors (torch.load with weights_only=True refused it: {detail[:160]})"
    return f"{type(exc).__name__}: {text[:200]}"


def load_checkpoint(
    path: Path, fingerprint: str, model: torch.nn.Module, identity: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Load and check a checkpoint for this run; any problem raises ConfigError naming the file and the fix.

    `identity` (e.g. {"data_sha256": ..., "precision": "bf16"}) is what the run computes on and with, beyond its
    config: a checkpoint written on other data or in other arithmetic is refused, naming the key that differs."""
    fix = f"to start this run over, delete {path} (or the whole run directory {path.parent.parent})"
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        reason = _load_error_reason(exc)
        raise ConfigError(f"checkpoint {path} ({size} bytes) cannot be read: {reason}; {fix}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} is not a resnet_repro checkpoint (format {FORMAT_VERSION}); {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); {fix}")
    saved_identity = state.get("identity", {})
    for key, value in (identity or {}).items():
        if saved_identity.get(key) != value:
            raise ConfigError(
                f"checkpoint {path} was written with {key}={saved_identity.get(key, 'unrecorded')!r}, this run has "
                f"{key}={value!r} (other data or other numerics would mix two runs in one); {fix}"
            )
    if state.get("config_fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration (config hash "
            f"{str(state.get('config_fingerprint'))[:12]} != {fingerprint[:12]} of this run); {fix}"
        )
    expected = model.state_dict()
    saved = state.get("model", {})
    if set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items()):
        raise ConfigError(f"checkpoint {path} holds a different architecture than model.arch/model.depth; {fix}")
    return state
