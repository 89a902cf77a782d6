"""Names of the files and directories a run directory and a sweep directory hold (the run-directory contract), in
one place."""

import re
from enum import Enum
from pathlib import Path

METRICS_NAME = "metrics.json"  # a finished run: written last and atomically; a rerun skips the run
FAILED_NAME = "failed.json"  # a failed run: the error and its traceback
SUMMARY_JSON = "sweep_summary.json"  # a sweep directory: what became of each planned run (written at the end)
PLAN_JSON = "sweep_plan.json"  # a sweep directory: the planned run directories (written at the start)
SUMMARY_LOG = "sweeps.log"  # a sweep directory: every summary, appended


def slugify(text: str) -> str:
    """Directory name for a data label: 'CIFAR-10 sample (5,085 train / 1,017 test)' -> 'cifar-10-sample-5085-...'."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "data"


def data_dir_name(source: str | Enum, path: str | None, label: str | None) -> str:
    """The data's directory level, runs/<this>/<experiment>/<run>: runs on different data never share a run directory
    (a finished sample run must not make a full-data run skip). The slug of data.label if set, else of the npz file's
    name, else 'cifar-10' (torchvision's download)."""
    source = getattr(source, "value", source)
    if label:
        return slugify(label)
    if source == "npz" and path:
        return slugify(Path(path).stem)
    return slugify("CIFAR-10")
