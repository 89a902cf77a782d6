#!/usr/bin/env python
"""`make bench`: a typical PyTorch reproduction vs our runner, side by side -> results/bench/bench-<device>.md/.json.

Thin entry over resnet_repro.bench (package); `python scripts/bench.py --help` lists the options.
"""

import sys

from resnet_repro.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
