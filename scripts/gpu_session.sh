#!/usr/bin/env bash
# What only a GPU can answer (issues 6 and 8), prepared for the device tool's short lease: two phases of one call
# each (under 10 min), every step under its own time limit so that a slow step costs only itself, and everything
# written under $OUT (the device tool brings $OUT back).
#
#   here:        ../shared/device/stage.sh                      # fills .device/ (wheels, sample, JPEG CIFAR-10)
#   device tool: run  command="bash scripts/gpu_session.sh A"  carry=[".device"]  timeout_s=570
#                run  command="bash scripts/gpu_session.sh B"  carry=[".device"]  timeout_s=<what is left>
#
# A 15-minute lease (start-up, a minute or more, included) fits A and about 200 s of B: run B at once after A,
# while the machine is warm, with timeout_s = what status says is left minus a minute; B's steps are in order of
# what issue 6 needs (K first), so a short B still brings the default K back. The step limits are estimates made
# without a GPU (no GPU was lent when this was written): after the first real run, set them from $OUT/steps.tsv.
#
# A: CUDA correctness gates and the runner learning on CUDA, eager, compiled and graphed (pytest -m gpu), then
#    `make bench` for ResNet-20 and ResNet-110 (every config).
# B: K runs per GPU (aggregate img/s, K = 1,2,4,8), then one full 64k-iteration ResNet-20 on CIFAR-10 (JPEG
#    re-encoded) through the real runner; a run cut off by its limit comes back with its checkpoint and resumes
#    when B is run again with $OUT/runs copied back into runs/ (or RUNS_DIR pointed at it).
# Afterwards, here (each call's $OUT starts empty there): merge both phases' reports into one table with the
# default K and the Figure-6 suite projection:
#   python scripts/bench.py --combine A_FILES/bench/bench-gpu-*.json B_FILES/bench/bench-gpu-k.json \
#     --out results/bench --tag <gpu name>
# Rehearse on a CPU machine (tiny sizes, the sample instead of CIFAR-10): GPU_SESSION_QUICK=1 PY=.venv/bin/python
#   OUT=/tmp/out bash scripts/gpu_session.sh A   (and B). Step results: $OUT/steps.tsv, logs: $OUT/<step>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh A|B}
OUT=${OUT:?set OUT to the folder that comes back}
QUICK=${GPU_SESSION_QUICK:-0}
PY=${PY:-python3}
RUNS_DIR=${RUNS_DIR:-$OUT/runs}
mkdir -p "$OUT"

if [ -d .device/wheels ] && ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if [ -f .device/data/cifar10_sample.npz ]; then export RESNET_REPRO_SAMPLE_NPZ=$PWD/.device/data/cifar10_sample.npz; fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log, record rc and seconds.
step() {
  local name=$1 limit=$2 started rc
  shift 2
  log "start $name (limit ${limit}s): $*"
  started=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$phase" "$name" "$rc" "$(($(date +%s) - started))" >>"$OUT/steps.tsv"
  log "end $name rc=$rc ($(($(date +%s) - started)) s)"
  tail -n 3 "$OUT/$name.log"
}

if [ "$QUICK" = 1 ]; then
  bench_sizes=(--windows 2 --iters 2 --warmup 1 --num-images 512 --ckpt-repeats 1)
  arch_a=resnet-20 arch_b=resnet-56 ks=1,2 k_iters=5 k_arches=resnet-20
  data=(data=npz data.path=../shared/data/cifar10-sample/cifar10_sample.npz "data.label='CIFAR-10 sample (rehearsal)'")
  train_len=(optim.max_iter=20 "optim.milestones=[10,15]" trainer.eval_every=10 trainer.log_every=5
    trainer.checkpoint_every=10)
else
  bench_sizes=(--windows 5 --iters 100 --warmup 20)
  arch_a=resnet-20 arch_b=resnet-110 ks=1,2,4,8 k_iters=300 k_arches=resnet-20,resnet-110
  data=(data=npz data.path=/tmp/cifar10_jpeg.npz "data.label='CIFAR-10 (JPEG re-encoded)'")
  train_len=()
fi

case $phase in
A)
  step env 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu \
--format=csv; $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, \
torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.is_available())'"
  step pytest-gpu 140 "$PY" -m pytest -v -m gpu -p no:cacheprovider tests
  step "bench-$arch_a" 140 "$PY" scripts/bench.py --arches "$arch_a" --ks '' --profile "${bench_sizes[@]}" \
    --out "$OUT/bench" --tag "gpu-$arch_a"
  # the deep net in two calls, so that the rows without compilation come back even if compiling is slow
  step "bench-$arch_b-eager" 110 "$PY" scripts/bench.py --arches "$arch_b" --ks '' \
    --configs baseline,ours-1,ours-2,ours-3,ours-5b --profile "${bench_sizes[@]}" --out "$OUT/bench" \
    --tag "gpu-$arch_b-eager"
  step "bench-$arch_b-compiled" 150 "$PY" scripts/bench.py --arches "$arch_b" --ks '' \
    --configs baseline,ours-4,ours-5 --no-checkpoint "${bench_sizes[@]}" --out "$OUT/bench" \
    --tag "gpu-$arch_b-compiled"
  ;;
B)
  # issue 6's measurement first (the default K and the Figure-6 suite projection); the data for the training run
  # is decoded only after it, so a short remainder of the lease still brings K back
  step bench-k 150 "$PY" scripts/bench.py --arches '' --ks "$ks" --k-arches "$k_arches" --k-iters "$k_iters" \
    "${bench_sizes[@]}" --out "$OUT/bench" --tag gpu-k
  if [ "$QUICK" != 1 ]; then
    step decode 90 "$PY" .device/data/to_npz.py /tmp/cifar10_jpeg.npz
  fi
  # The fastest runner first (the whole iteration as one CUDA graph); if it fails, the eager runner resumes the
  # same run directory (trainer.* keys do not change it) with what is left of the lease.
  train=("$PY" -m resnet_repro.train model=resnet model.depth=20 "${data[@]}" "${train_len[@]}" "runs_dir=$RUNS_DIR"
    trainer.progress=false)
  if [ "$QUICK" = 1 ]; then graphs=false; else graphs=true; fi
  step train-resnet-20 250 "${train[@]}" "trainer.cuda_graphs=$graphs"
  if ! grep -q $'\ttrain-resnet-20\t0\t' "$OUT/steps.tsv"; then
    step train-resnet-20-eager 150 "${train[@]}"
  fi
  ;;
*)
  echo "unknown phase $phase: A or B" >&2
  exit 2
  ;;
esac
log "phase $phase done"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
