#!/usr/bin/env bash
# What only a GPU can answer (issues 6 and 8), prepared for the device tool's short lease: two phases of one call
# each, every step under its own time limit so that a slow step costs only itself.
#
#   here:        ../shared/device/stage.sh         # fills .device/ (wheels, sample, JPEG CIFAR-10)
#                .venv/bin/python -c 'from resnet_repro.tracking import git_sha; print(git_sha())' > .device/git_sha
#   device tool: run  command="bash scripts/gpu_session.sh A"  carry=[".device"]  timeout_s=570
#                run  command="bash scripts/gpu_session.sh B"  carry=[".device"]  timeout_s=<left - 60>
#
# A 15-minute lease includes the machine's start (a minute or more): A and about 200 s of B fit. Run B at once
# after A (the machine stays warm for 30 s only). Each phase's steps are in the order of what issue 6 needs, so a
# phase cut short still brings back what came first. The step limits are estimates made without a GPU (none was
# lent when this was written): after the first real run, set them from steps.tsv.
#
# A: `make bench` rows without compilation for ResNet-20 and ResNet-110 (baseline, (1)-(3), (5b) CUDA graph, and
#    (3g)/(5bg) with the paper's BN over 64 images),
#    K runs per GPU (aggregate img/s, K = 1,2,4,8), then the CUDA correctness gates and the runner learning on
#    CUDA, eager, compiled and graphed (pytest -m gpu).
# B: the compiled rows ((4), (5)) for ResNet-20 and ResNet-110, `make reproduce PROFILE=quick` on the sample
#    through the local launcher (K runs per GPU, measured by RESNET_REPRO_RUNS_PER_GPU=auto), then one full 64k-iteration ResNet-20 on CIFAR-10
#    (JPEG re-encoded) through the real runner (graphed; the eager runner resumes it if that fails). A run cut off
#    by its limit comes back with its checkpoint; it resumes in a later call that carries it back (e.g. extract it
#    into runs/gpu, carry [".device", "runs/gpu"], RUNS_DIR=runs/gpu).
#
# What comes back: the device tool returns at most 8 files from $OUT, at most 2 folders deep, with plain names, so
# everything is written under $WORK and packed into $OUT/phase-<A|B>.tgz after every step (a new archive
# replaces the old one whole); $OUT/session.log and $OUT/steps.tsv sit beside it. Afterwards, here:
#   mkdir -p /tmp/gpuA /tmp/gpuB && tar xzf FILES_AT_A/phase-A.tgz -C /tmp/gpuA && tar xzf FILES_AT_B/phase-B.tgz -C /tmp/gpuB
#   python scripts/bench.py --combine /tmp/gpuA/bench/*.json /tmp/gpuB/bench/*.json --out results/bench --tag <gpu>
# (one table with the default K and the Figure-6 suite projection over both phases' rows).
# Rehearse on a CPU machine (tiny sizes, the sample instead of CIFAR-10): GPU_SESSION_QUICK=1 PY=.venv/bin/python
#   OUT=/tmp/out bash scripts/gpu_session.sh A   (and B).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh A|B}
OUT=${OUT:?set OUT to the folder that comes back}
QUICK=${GPU_SESSION_QUICK:-0}
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu-session-$phase}
RUNS_DIR=${RUNS_DIR:-$WORK/runs}
mkdir -p "$OUT" "$WORK"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

# pack: $WORK into $OUT/phase-$phase.tgz, replacing the previous archive only once the new one is complete. The
# quick reproduction's checkpoints stay behind (finished runs; together they would pass the 16 MiB a file may
# have), the 64k run's comes along (it resumes from it).
pack() {
  tar czf "$OUT/phase-$phase.tgz.tmp" -C "$WORK" --exclude='./runs-quick/*/*/checkpoints' . &&
    mv -f "$OUT/phase-$phase.tgz.tmp" "$OUT/phase-$phase.tgz"
  local mib=$(($(stat -c %s "$OUT/phase-$phase.tgz") / 1048576))
  if [ "$mib" -ge 15 ]; then log "WARNING: phase-$phase.tgz is $mib MiB; the device tool returns files up to 16 MiB"; fi
}

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $WORK/NAME.log, record rc and seconds, pack.
step() {
  local name=$1 limit=$2 started rc
  shift 2
  log "start $name (limit ${limit}s): $*"
  started=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$phase" "$name" "$rc" "$(($(date +%s) - started))" | tee -a "$WORK/steps.tsv" \
    >>"$OUT/steps.tsv"
  log "end $name rc=$rc ($(($(date +%s) - started)) s)"
  tail -n 3 "$WORK/$name.log"
  pack
}

if [ -d .device/wheels ] && ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
if [ -f .device/git_sha ]; then export RESNET_REPRO_GIT_SHA=$(cat .device/git_sha); fi

if [ "$QUICK" = 1 ]; then
  sample=../shared/data/cifar10-sample/cifar10_sample.npz
  bench_sizes=(--windows 2 --iters 2 --warmup 1 --num-images 512 --ckpt-repeats 1)
  arch_a=resnet-20 arch_b=resnet-56 ks=1,2 k_iters=5 k_arches=resnet-20
  data=(data=npz "data.path=$sample" "data.label='CIFAR-10 sample (rehearsal)'")
  train_len=(optim.max_iter=20 "optim.milestones=[10,15]" trainer.eval_every=10 trainer.log_every=5
    trainer.checkpoint_every=10)
  quick_len=(optim.max_iter=6 "optim.milestones=[3,5]" trainer.eval_every=3 trainer.log_every=3
    trainer.checkpoint_every=3)
else
  sample=.device/data/cifar10_sample.npz
  bench_sizes=(--windows 5 --iters 100 --warmup 20)
  arch_a=resnet-20 arch_b=resnet-110 ks=1,2,4,8 k_iters=200 k_arches=resnet-20,resnet-110
  data=(data=npz data.path=/tmp/cifar10_jpeg.npz "data.label='CIFAR-10 (JPEG re-encoded)'")
  train_len=() quick_len=()
fi
if [ ! -f "$sample" ]; then  # the runner tests would skip without it, and the lease would be spent for less
  log "the CIFAR-10 sample is missing at $sample: run ../shared/device/stage.sh here and carry .device"
  exit 2
fi
export RESNET_REPRO_SAMPLE_NPZ=$PWD/$sample
pytest_limits=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then pytest_limits=(--timeout=90); fi

bench() {  # bench NAME LIMIT_S BENCH_ARGS...: one call of make bench's script, its report under $WORK/bench
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" scripts/bench.py "$@" "${bench_sizes[@]}" --out "$WORK/bench" --tag "gpu-$name"
}

case $phase in
A)
  step env 20 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu \
--format=csv; $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, \
torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.is_available())'"
  # (3g)/(5bg): the same with the paper's BN statistics (ghost BN over 64), what model.bn_group=64 would cost
  eager=(--ks '' --configs baseline,ours-1,ours-2,ours-3,ours-5b,ours-3g,ours-5bg --profile)
  bench "$arch_a-eager" 90 --arches "$arch_a" "${eager[@]}"
  bench "$arch_b-eager" 125 --arches "$arch_b" "${eager[@]}"
  bench k 130 --arches '' --ks "$ks" --k-arches "$k_arches" --k-iters "$k_iters"
  step pytest-gpu 160 "$PY" -m pytest -v -m gpu -p no:cacheprovider --durations=0 "${pytest_limits[@]}" tests
  ;;
B)
  compiled=(--ks '' --configs baseline,ours-4,ours-5 --no-checkpoint)
  bench "$arch_a-compiled" 100 --arches "$arch_a" "${compiled[@]}"
  bench "$arch_b-compiled" 130 --arches "$arch_b" "${compiled[@]}"
  # the product end to end on CUDA: make reproduce's quick profile (4 runs on the sample, a sweep through the
  # local launcher with K runs sharing the GPU by slots, K measured first by `auto` and cached under $WORK/cache,
  # Figure 7 responses, plots)
  step reproduce-quick 180 env RESNET_REPRO_RUNS_PER_GPU=auto "RESNET_REPRO_CACHE_DIR=$WORK/cache" \
    "RESNET_REPRO_SLOT_DIR=$WORK/slots" "$PY" -m \
    resnet_repro.reproduce --profile quick --data "$sample" --label "CIFAR-10 sample (GPU smoke)" --launcher local \
    --runs-dir "$WORK/runs-quick" --results-dir "$WORK/results" "${quick_len[@]}"
  if [ "$QUICK" != 1 ]; then
    step decode 60 "$PY" .device/data/to_npz.py /tmp/cifar10_jpeg.npz
  fi
  # The fastest runner first (the whole iteration as one CUDA graph); if it fails, the eager runner resumes the
  # same run directory (trainer.* keys do not change it) with what is left of the lease.
  train=("$PY" -m resnet_repro.train model=resnet model.depth=20 "${data[@]}" "${train_len[@]}" "runs_dir=$RUNS_DIR"
    trainer.progress=false)
  if [ "$QUICK" = 1 ]; then graphs=false; else graphs=true; fi
  step train-resnet-20 250 "${train[@]}" "trainer.cuda_graphs=$graphs"
  if ! grep -q $'\ttrain-resnet-20\t0\t' "$WORK/steps.tsv"; then
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
