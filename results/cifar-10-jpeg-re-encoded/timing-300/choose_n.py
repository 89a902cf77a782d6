"""The CPU profile's iteration count from the 300-iteration timings in this folder (one run directory per net).

Usage: python choose_n.py [TIMING_DIR]. Prints each net's seconds per iteration and per test evaluation, then the
largest N for which each half of the profile (four nets) fits 100 min with a 25 % margin.
"""

import json
import re
import sys
from datetime import datetime
from pathlib import Path

BUDGET_S = 100 * 60 / 1.25  # each half <= 100 min with a 25 % margin
EVALS = 4 + 1  # test evaluations per run (every N/4) and one more for Figure 7's responses at the end
STAMP = r"\[(\S+ \S+)\]\[resnet_repro.engine\]\[INFO\] - iter 300(/300| test)"


def eval_seconds(log: str) -> float:
    """Seconds from the last training log line to the test-error line: one evaluation of the 10k test images."""
    stamps = {kind: datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t, kind in re.findall(STAMP, log)}
    return (stamps[" test"] - stamps["/300"]).total_seconds()


def between(a: float, b: float, depth: int) -> float:
    """Cost at `depth` from the costs at 20 and 56: linear in depth (the same block repeated)."""
    return a + (b - a) * (depth - 20) / 36


folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
nets = {}
for path in sorted(folder.glob("*/metrics.json")):
    m = json.loads(path.read_text())
    nets[m["arch"], m["depth"]] = (m["ms_per_iter"] / 1000, eval_seconds((path.parent / "train.log").read_text()))
    print(f"{m['arch']}-{m['depth']}: {nets[m['arch'], m['depth']][0]:.3f} s/iter (training, mean of 300), "
          f"{nets[m['arch'], m['depth']][1]:.0f} s per evaluation, wall {m['wall_time_s']:.0f} s")
for arch in ("plain", "resnet"):
    (s20, e20), (s56, e56) = nets[arch, 20], nets[arch, 56]
    per_iter = sum(between(s20, s56, d) for d in (20, 32, 44, 56))
    evals = EVALS * sum(between(e20, e56, d) for d in (20, 32, 44, 56))
    print(f"{arch} half: {per_iter:.2f} s per iteration of all four nets, {evals:.0f} s of evaluation "
          f"-> N <= {(BUDGET_S - evals) / per_iter:.0f}")
