#!/usr/bin/env python
"""`make bench` -> results/bench/bench-<device>.md/.json; the code is resnet_repro/bench/, `--help` the options."""

import sys

from resnet_repro.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
