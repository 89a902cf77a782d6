# resnet_repro: the reproduction log. `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The torch build: pypi = the default index's (PyPI, or the mirror pip is configured for; on Linux x86_64 a CUDA
# build, torch 2.9+ for CUDA 12.8/13.0), or one of PyTorch's own indexes by the CUDA version it is made for
# (download.pytorch.org/whl/<TORCH>): cu126 and cu128 run on NVIDIA drivers >= 525 (cu128 also on Blackwell GPUs),
# cu130 needs >= 580, cpu has no CUDA. The stamp records the choice; without TORCH the installed one stays (pypi for a
# new .venv: it installs wherever pip does, offline mirrors and CI included).
TORCH_BUILDS := pypi cu126 cu128 cu130 cpu
INSTALLED_TORCH := $(shell cat $(STAMP) 2>/dev/null)
TORCH ?= $(or $(INSTALLED_TORCH),pypi)
TORCH_INDEX := $(if $(filter pypi,$(TORCH)),,--index-url https://download.pytorch.org/whl/$(TORCH) )
PROFILE ?= paper
DATA ?=
LAUNCHER ?=
LABEL ?=
OVERRIDES ?=
SAMPLE := ../shared/data/cifar10-sample/cifar10_sample.npz

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint smoke reproduce plot bench download tensorboard clean FORCE

ifeq ($(filter $(TORCH),$(TORCH_BUILDS)),)
$(error TORCH=$(TORCH) is not valid: one of $(TORCH_BUILDS) (the CUDA version of the torch build; nvidia-smi shows the newest one your driver runs))
endif
# A TORCH given on the command line or in the environment that is not the installed build reinstalls torch.
ifneq ($(filter command line environment,$(origin TORCH)),)
ifneq ($(TORCH),$(INSTALLED_TORCH))
$(STAMP): FORCE
endif
endif

help: ## list every target with one line each
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: TORCH=pypi|cu126|cu128|cu130|cpu (install: the torch build; default the installed one, else pypi)"
	@echo "             PROFILE=paper|quick  DATA=path/to/file.npz (default: CIFAR-10 download)  LABEL='data label'  LAUNCHER=local|slurm|submitit_local  OVERRIDES='key=value ...' (Hydra overrides for every run)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(if $(filter-out $(INSTALLED_TORCH),$(TORCH)),$(PIP) uninstall -y torch torchvision)
	# torch and torchvision in one call from one index, so pip picks a matching pair built for $(TORCH)
	$(PIP) install $(TORCH_INDEX)"torch>=2.4" "torchvision>=0.19"
	$(PIP) install -e ".[dev,parallel,slurm]"
	$(PY) -c "import torch, torchvision, hydra, omegaconf; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| hydra', hydra.__version__)"
	echo $(TORCH) > $(STAMP)

install: $(STAMP) ## create .venv with the torch build TORCH=pypi|cu126|cu128|cu130|cpu and the package with all extras

test: $(STAMP) ## install if needed, then run the default test suite (CPU, no network, a few minutes)
	$(VENV)/bin/pytest -q

test-all: $(STAMP) ## the default suite plus slow tests
	$(VENV)/bin/pytest -q -m "not gpu"

lint: $(STAMP) ## ruff lint
	$(VENV)/bin/ruff check .

smoke: $(STAMP) ## one tiny ResNet-20 run on the CIFAR-10 sample (CPU, about a minute; trains afresh each time)
	rm -rf runs/cifar10-sample/smoke
	$(PY) -m resnet_repro.train experiment=smoke data=npz data.path=$(SAMPLE)

download: $(STAMP) ## download CIFAR-10 into ./data with torchvision
	$(PY) -m resnet_repro.download --root ./data

reproduce: $(STAMP) ## download -> every experiment -> plots (PROFILE=quick DATA=file.npz for the CPU version)
	$(PY) -m resnet_repro.reproduce --profile $(PROFILE) $(if $(DATA),--data $(DATA)) $(if $(LABEL),--label "$(LABEL)") $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(OVERRIDES)

plot: $(STAMP) ## redraw Figure 6/7 and Table 6 from finished runs (RUNS=runs/<data>/<experiment> OUT=results/<dir>)
	$(PY) -m resnet_repro.plot $(or $(RUNS),runs) --out $(or $(OUT),results/latest)

bench: $(STAMP) ## throughput benchmark: typical reproduction vs our runner, side by side -> results/bench/
	$(PY) scripts/bench.py $(BENCH_ARGS)

tensorboard: $(STAMP) ## TensorBoard over all runs
	$(VENV)/bin/tensorboard --logdir runs

clean: ## remove the virtualenv and caches (keeps runs/ and data/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
