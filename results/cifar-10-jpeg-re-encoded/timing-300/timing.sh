#!/bin/bash
# 300 iterations of plain/ResNet at depth 56 and 20 on the JPEG set, fp32 + channels_last, one eval at the end
cd "$(git rev-parse --show-toplevel)"  # ran in a checkout of commit 2bb013e
export GOMP_CPU_AFFINITY=0-1  # one torch thread per core, so niced helper jobs cannot crowd both onto one core
exec nice -n 5 .venv/bin/python -m resnet_repro.train -m runs_dir=runs_timing \
  model.arch=plain,resnet model.depth=56,20 optim.max_iter=300 'optim.milestones=[150,225]' \
  trainer.log_every=50 trainer.eval_every=300 trainer.checkpoint_every=300 trainer.progress=false responses=false \
  trainer.device=cpu trainer.precision=fp32 trainer.channels_last=true \
  data=npz data.path=cifar10_jpeg.npz 'data.label="CIFAR-10 (JPEG re-encoded)"'
