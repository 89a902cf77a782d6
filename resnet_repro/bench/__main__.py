"""`python -m resnet_repro.bench`: the benchmark (also how the K-sweep worker processes start)."""

import sys

from resnet_repro.bench.cli import main

sys.exit(main())
