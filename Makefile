# mnist-sweep: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
SWEEP ?= momentum_decay
WORKERS ?=
SEEDS ?= 3
SERVER_DIR ?= /tmp/mnist-sweep-server
# Where `make train/bench` find MNIST: the shared copy beside the repo when present, else ./data
# (downloaded there by torchvision on first use). Override: make train DATA=/path/to/mnist
DATA ?= $(if $(wildcard ../shared/data/mnist),../shared/data/mnist,./data)
export MNIST_SWEEP_DATA ?= $(DATA)

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-full test-docker test-slurm k8s-manifest train ui sweep server worker sweep-show confirm seed-table bench bench-sweep bench-population bench-scale bench-scale-out bench-confirm bench-diverged bench-bookkeeping bench-startup lint docs docs-build clean dashboard readme-images

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## create .venv and install the package with pinned dependencies
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	@# compat: src/ on the path, so that Hydra finds our sweeper plugin by walking the
	@# hydra_plugins folder (setuptools' default editable finder hides it from that walk).
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat

test: ## run the fast test suite (synthetic data, no network)
	$(PY) -m pytest -q -n 2 --dist worksteal

test-slow: ## run only the slow tier (real MNIST from ../shared, long checks)
	$(PY) -m pytest -q -n 2 --dist worksteal -m slow

test-full: ## run the fast suite and the slow tier
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not docker" --durations=25

test-slurm: ## sweep.launcher=slurm against a real single-node SLURM started as root (munge, slurmctld, slurmd from apt)
	$(PY) -m pytest -q -p no:xdist -m slow tests/test_slurm.py

test-docker: ## build the images and run the compose stack for real (root, Docker; ~3 min, ~10 on the first build)
	$(PY) -m pytest -q -s -m docker tests/test_compose_stack.py

lint: ## ruff (lint and format check) and mypy (types) on src/ (their settings: pyproject.toml)
	$(PY) -m ruff check src/
	$(PY) -m ruff format --check src/
	$(PY) -m mypy

docs: ## serve the documentation site (docs/, mkdocs-material) on http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

docs-build: ## build the documentation site into site/ with --strict: a broken link, anchor or page fails
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

train: ## train one trial of the seed note's configuration (ARGS="optim.momentum=0.9 schedule=step")
	$(PY) -m mnist_sweep.train $(ARGS)

ui: ## open the MLflow UI on http://127.0.0.1:5000 over the local store; prints each study's deep link (its trials, best first)
	@$(PY) -m mnist_sweep.tracking.review --tracking-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

sweep: ## run or resume a sweep (SWEEP=momentum_decay|momentum|seed_note|wide, WORKERS=N, ARGS="sweep.n_trials=60 train.epochs=5")
	$(PY) -m mnist_sweep.sweep --sweep $(SWEEP) $(if $(WORKERS),sweep.workers=$(WORKERS)) $(ARGS)

readme-images: ## remake docs/images/*.png from a real default sweep on real MNIST (DATA=../shared/data/mnist; needs chromium and chromium-driver)
	$(PY) docs/readme_images.py --data $(or $(DATA),../shared/data/mnist) $(if $(WORKDIR),--workdir $(WORKDIR))

dashboard: ## optuna-dashboard on http://127.0.0.1:8080 over the study storage ($$SWEEP_STORAGE, else sqlite:///optuna.db; through PgBouncer too): a live view of a running study
	$(PY) -m mnist_sweep.dashboard --host 127.0.0.1 --port $${DASHBOARD_PORT:-8080}

server: ## start PostgreSQL, PgBouncer and an MLflow server on 127.0.0.1 for many workers (data in SERVER_DIR; needs pgbouncer)
	$(PY) -m mnist_sweep.server --dir $(SERVER_DIR) $(ARGS)

worker: ## join a running SWEEP's study on the shared servers: `source $(SERVER_DIR)/urls.env` first (sets SWEEP_STORAGE, MLFLOW_TRACKING_URI)
	@test -n "$$SWEEP_STORAGE" || { echo "error: SWEEP_STORAGE is not set: run 'source $(SERVER_DIR)/urls.env' (written by make server) first." >&2; exit 2; }
	$(PY) -m mnist_sweep.sweep --join --sweep $(SWEEP) $(if $(WORKERS),sweep.workers=$(WORKERS)) $(ARGS)

k8s-manifest: ## print Kubernetes manifests for SWEEP (a Job creating the study, an Indexed Job of GPU workers); ARGS="sweep.kubernetes.workers=8 ..."
	$(PY) -m mnist_sweep.sweep --kubernetes --sweep $(SWEEP) $(ARGS)

confirm: ## confirm a finished SWEEP's top trials over fresh seeds (momentum_decay: its top 5 x 5; others: ARGS="sweep.confirm.top=5"); resumable
	$(PY) -m mnist_sweep.sweep --sweep $(SWEEP) --confirm $(ARGS)

sweep-show: ## print a sweep's resolved settings and search space (and with sweep.launcher=slurm the batch script), run nothing
	$(PY) -m mnist_sweep.sweep --sweep $(SWEEP) --show $(ARGS)

seed-table: ## the note's three configurations over SEEDS seeds, as a markdown table
	$(PY) -m mnist_sweep.seed_table --seeds $(SEEDS) $(ARGS)

bench-sweep: ## pruning vs none, 1 vs 2 workers, per-trial overhead, a sweep's fixed cost (real MNIST)
	$(PY) tests/benchmarks/bench_sweep.py $(ARGS)

bench-population: ## populations of 4, 16, 64 against one trial at a time on this device; the default sweep with population=auto
	$(PY) tests/benchmarks/bench_population.py $(ARGS)

bench-scale: ## load: 8 workers x 200 tiny trials on PostgreSQL + MLflow server, 4 x 100 on SQLite; errors, duplicates, wall time
	$(PY) tests/benchmarks/bench_scale.py $(ARGS)

bench-scale-out: ## 8, 64, 256, 1000 simulated workers through PgBouncer: trials/min, latencies, connections, errors (~25 min; ARGS="--faults")
	$(PY) tests/benchmarks/bench_scale_out.py $(ARGS)

bench-confirm: ## the default sweep, then its top 5 x 5 fresh seeds one at a time and as one population: what changes, what it costs (real MNIST, ~15 min)
	$(PY) tests/benchmarks/bench_confirm.py $(ARGS)

bench-diverged: ## diverged trials told to Optuna as FAIL vs pruned with NaN: the share diverged per 20 trials, same space and seed (real MNIST)
	$(PY) tests/benchmarks/bench_diverged.py $(ARGS)

bench-bookkeeping: ## a trial's store work: solo and populations of 16, 64, 256 with training negligible, plain disk and 15 ms fsyncs; commits, fsyncs, CPU by part
	$(PY) tests/benchmarks/bench_bookkeeping.py $(ARGS)

bench-startup: ## a short sweep's fixed cost by phase against `import torch`, before (ARGS="--against REV") and now; make train's first epoch line (real MNIST)
	$(PY) tests/benchmarks/bench_startup.py $(ARGS)

bench: ## time our epoch against a pytorch/examples loop and a GEMM floor; tracking overhead
	$(PY) tests/benchmarks/bench_trial.py $(ARGS)

clean: ## remove Hydra outputs (keeps mlflow.db and mlruns/)
	rm -rf outputs multirun .pytest_cache
