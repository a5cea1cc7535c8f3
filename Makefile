# Thin layer over the featcache CLI. Variables pass straight through, e.g.
#   make features BACKBONE=xception
#   make head HEAD=logreg
#   make finetune EPOCHS=1
#   make finetune EPOCHS=3 VIEWS=orig,flip     (no GPU: trains the top stages from cached activations)
#   make finetune MODE=full EPOCHS=1 FINETUNE_ARGS="--max-steps 20 --subset 500 --unfreeze top:20"
PYTHON ?= python3
VENV ?= .venv
FC := $(VENV)/bin/featcache

BACKBONE ?= xception
WEIGHTS ?= imagenet
DATA ?= cifar10
SIZE ?=
BATCH ?=
CACHE_DIR ?= cache
VIEWS ?= orig
ENGINE ?= auto
PRECISION ?= auto
HEAD ?= mlp
EPOCHS ?=
LR ?=
RUN ?=
# finetune: MODE auto (full with a GPU, else cached), cached or full; CUT top:N or a layer (cached mode, and
# `make features CUT=...` to cache those activations alone).
MODE ?= auto
CUT ?=

# Path variables are quoted so that folders with spaces or non-ASCII names work in every target.
FEATURE_ARGS = --backbone "$(BACKBONE)" --weights "$(WEIGHTS)" --data "$(DATA)" --cache-dir "$(CACHE_DIR)" \
	--views "$(VIEWS)" --precision "$(PRECISION)" $(if $(SIZE),--size $(SIZE))

.PHONY: install test features head sweep finetune bench demo clean

install:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[test,lite,tflite]"

test:
	$(VENV)/bin/python -m pytest -q

features:
	$(FC) features $(FEATURE_ARGS) --engine $(ENGINE) $(if $(BATCH),--batch-size $(BATCH)) $(if $(CUT),--cut "$(CUT)")

head:
	$(FC) head $(FEATURE_ARGS) --head $(HEAD) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size $(BATCH)) $(if $(LR),--lr $(LR))

sweep:
	$(FC) head $(FEATURE_ARGS) --sweep $(if $(EPOCHS),--epochs $(EPOCHS))

finetune:
	$(FC) finetune $(FEATURE_ARGS) --mode "$(MODE)" $(if $(CUT),--cut "$(CUT)") $(if $(RUN),--run $(RUN)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size $(BATCH)) $(FINETUNE_ARGS)

bench:
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/bench_finetune.py $(BENCH_FINETUNE_ARGS)

# Offline end to end on scikit-learn's digits with EfficientNet-Lite0 ImageNet weights (pip-installed).
DEMO_ARGS = --backbone efficientnet_lite0 --weights imagenet --data digits --size 128 --cache-dir "$(CACHE_DIR)"
demo:
	$(FC) features $(DEMO_ARGS) --no-progress
	$(FC) head $(DEMO_ARGS) --head logreg
	$(FC) head $(DEMO_ARGS) --head mlp --epochs 30
	$(FC) finetune $(DEMO_ARGS) --epochs 1 --max-steps 25 --no-export
	$(FC) runs --cache-dir "$(CACHE_DIR)"

# Removes only what featcache made inside CACHE_DIR (and refuses an empty, root, home or project CACHE_DIR).
clean:
	rm -rf .pytest_cache build
	$(FC) clean --cache-dir "$(CACHE_DIR)"
