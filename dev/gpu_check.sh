#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can answer, most important first, in at most 6 minutes (the step limits
# add up to 360 s). Each step's log lands in $OUT as the step ends; $OUT/steps.tsv has one line per step: name,
# exit status, seconds (124 = its time limit, 0 = passed or skipped).
#   1 cuda-tests  the CUDA correctness tests without compilation (pytest -m gpu -k 'not compiled'), after the
#                 machine's GPU, driver and torch versions
#   2 runner-110  the real runner, CUDA-graphed, on ResNet-110: the warm-up's lr switch and an lr milestone happen
#                 inside the graph; killed (kill -9) mid-run and resumed from its checkpoint to the end
#   3 bench       a minimal `make bench`: baseline vs our eager step (ours-3) vs graphed (ours-5b) on ResNet-20 and
#                 ResNet-110, and K = 1, 2, 4 processes of ResNet-56 at once -> $OUT/bench/bench-gpu-check.md/.json
#   4 compiled    the compiled CUDA tests (torch.compile; the slowest to start, so last)
#
# Usage, from the repository root:  OUT=DIR SAMPLE=cifar10_sample.npz bash dev/gpu_check.sh
#   PY        the Python with torch (default python3)
#   SAMPLE    the CIFAR-10 sample npz (6,102 images): the runner tests and step 2 train on it
#   WHEELS    a folder of wheels for what that Python lacks (hydra-core, omegaconf, ...): installed into /tmp/site
#   RESNET_REPRO_GIT_SHA  the commit, recorded in run directories when the tree travels without .git
# Rehearsal on a machine without CUDA: GPU_CHECK_QUICK=1 shrinks step 2 to a CPU run of the same kill and resume;
# steps 1, 3 and 4 need CUDA and say that they skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the logs go to}
SAMPLE=${SAMPLE:?set SAMPLE to the CIFAR-10 sample npz}
PY=${PY:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RESNET_REPRO_SAMPLE_NPZ=$SAMPLE
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$SAMPLE" ] || { echo "SAMPLE=$SAMPLE: no such file" >&2; exit 2; }
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))') || exit 2

# step NAME LIMIT_S FUNCTION: run FUNCTION under a time limit, its output into $OUT/NAME.log, one line in steps.tsv
step() {
  local name=$1 limit=$2 started rc
  started=$(date +%s)
  echo "[$(date -u +%H:%M:%S)] $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=5 "$limit" bash -c "$3" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" >>"$OUT/steps.tsv"
  echo "[$(date -u +%H:%M:%S)] $name: exit $rc in $(($(date +%s) - started)) s; last lines:"
  tail -n 3 "$OUT/$name.log"
}
export PY SAMPLE QUICK CUDA WORK OUT

needs_cuda() {
  if [ "$CUDA" != 1 ]; then
    echo "SKIPPED: needs CUDA, and torch sees no GPU on this machine"
    exit 0
  fi
}

cuda_tests() {
  needs_cuda
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv
  "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
  "$PY" -m pytest -v -m gpu -k "not compiled" -p no:cacheprovider --durations=0 tests
}

runner_110() {
  local args kill_at
  if [ "$QUICK" = 1 ]; then
    args=(model.depth=8 data.batch_size=32 optim.max_iter=60 "optim.milestones=[45]" optim.warmup_max_iter=15
      trainer.log_every=5 trainer.checkpoint_every=10 trainer.eval_every=30)
    kill_at=35
  else
    args=(model.depth=110 optim.max_iter=1000 "optim.milestones=[600]" optim.warmup_max_iter=100
      trainer.log_every=25 trainer.checkpoint_every=100 trainer.eval_every=500)
    kill_at=250
  fi
  if [ "$CUDA" = 1 ]; then
    args+=(trainer.cuda_graphs=true)
  elif [ "$QUICK" = 1 ]; then
    echo "no CUDA: rehearsing the kill and resume with the eager runner on the CPU"
    args+=(trainer.device=cpu trainer.threads=1)
  else
    needs_cuda
  fi
  # the paper's warm-up (lr 0.01 until the training error is below 88 % over 10 minibatches, at most
  # warmup_max_iter iterations), then 0.1, then 0.01 at the milestone: two rate changes inside the graph
  local cmd=("$PY" -m resnet_repro.train model=resnet data=npz "data.path=$SAMPLE" "hydra.run.dir=$WORK/run"
    trainer.progress=false optim.warmup=true optim.warmup_until_err=88 optim.warmup_window=10 "${args[@]}")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" >"$WORK/first.log" 2>&1 &
  local pid=$!
  until grep -q "iter $kill_at/" "$WORK/first.log" || ! kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid"
  echo "first run: exit $? (137 = killed)"
  cat "$WORK/first.log"
  echo "=== resumed"
  "${cmd[@]}" 2>&1 | tee "$WORK/second.log"
  local rc=${PIPESTATUS[0]}
  local failed=0
  check() { if grep -q "$2" "$3"; then echo "ok: $1"; else echo "FAILED: $1 (no '$2' in the log)"; failed=1; fi; }
  check "the first run was killed before it finished" "iter $kill_at/" "$WORK/first.log"
  if grep -q "finished: test err" "$WORK/first.log"; then
    echo "FAILED: the first run finished before the kill"
    failed=1
  fi
  check "the warm-up switched its rate" "warm-up ends at iteration" "$WORK/first.log"
  check "the second run resumed from a checkpoint" "resumed from .* at iteration" "$WORK/second.log"
  check "the resumed run finished" "finished: test err" "$WORK/second.log"
  if [ "$CUDA" = 1 ]; then
    check "both runs captured the graph" "CUDA graph captured" "$WORK/first.log"
    check "the resumed run captured the graph" "CUDA graph captured" "$WORK/second.log"
  fi
  echo "the same iteration before the kill and after the resume (on the CPU identical; on CUDA the same data and
rates, the numbers within cuDNN's non-determinism):"
  grep -h "iter $kill_at/" "$WORK/first.log" "$WORK/second.log"
  echo "resumed run: exit $rc"
  [ "$rc" = 0 ] && [ "$failed" = 0 ]
}

bench() {
  needs_cuda
  "$PY" scripts/bench.py --arches resnet-20,resnet-110 --configs baseline,ours-3,ours-5b --windows 3 --iters 50 \
    --warmup 10 --num-images 10000 --ks 1,2,4 --k-arches resnet-56 --k-iters 200 \
    --k-num-images 10000 --out "$OUT/bench" --tag gpu-check
}

compiled() {
  needs_cuda
  "$PY" -m pytest -v -m gpu -k compiled -p no:cacheprovider --durations=0 tests
}

export -f needs_cuda cuda_tests runner_110 bench compiled
: >"$OUT/steps.tsv"
step cuda-tests 70 cuda_tests
step runner-110 90 runner_110
step bench 110 bench
step compiled 90 compiled
rm -rf "$WORK"
echo "steps (name, exit, seconds):"
cat "$OUT/steps.tsv"
