"""Download CIFAR-10 (python version, 163 MB) with torchvision into a directory, and check that it loads.

    python -m resnet_repro.download --root ./data        (make download)

Training with `data=cifar10 data.root=DIR` reads the same files; without network, use `data=npz data.path=FILE`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from resnet_repro.errors import ConfigError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Download (if not already there) and load CIFAR-10; print what was found. Exit 2 when it cannot be loaded."""
    parser = argparse.ArgumentParser(prog="python -m resnet_repro.download", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="./data", help="directory for the download (default ./data = data.root)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from resnet_repro.data import load_cifar10

    try:
        arrays = load_cifar10(args.root)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{arrays.label} in {args.root}: {len(arrays.y_train):,} training and {len(arrays.y_test):,} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
