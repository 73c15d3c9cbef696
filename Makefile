# picollm: every target sets up its own environment first (.venv, pinned by requirements.lock).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared/data
ARGS   ?=
MODEL  ?= picollm-linear@champion
PROMPT ?= 2 4 6 8
NPROC  ?= 2
CONFIG ?= configs/linear.yaml
PORT   ?= 5002
UI_PORT ?= 5000
# The store `make ui` / `make serve` read: picollm's default (./mlflow.db) unless MLFLOW_TRACKING_URI is set.
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

# Offline copies for tests and CI, used only where ../shared/data exists (see README).
ifneq ($(wildcard $(SHARED)/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED)/tiktoken_cache)
endif

# PostgreSQL for `make server` / `make test-integration`: Debian's package, installed when missing and root.
PG_INSTALL = command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql || \
	    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }; \
	  else echo "PostgreSQL is missing: run 'sudo apt-get install postgresql'" >&2; exit 1; fi; }

.DEFAULT_GOAL := help
.PHONY: help setup train-baseline train-linear train-ddp dpo compare learning-curve new-rules recall analyze generate models ui serve test test-all lint docs bench sweep lock clean server server-stop test-integration screenshots

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev,server]"
	touch $@

setup: $(BIN)/.installed ## Create .venv with the pinned dependencies (torch 2.13.0 as pip finds it; CPU build: README)

train-baseline: setup ## Train the softmax baseline (configs/baseline.yaml) and register picollm-baseline
	$(BIN)/picollm train configs/baseline.yaml $(ARGS)

train-linear: setup ## Train the linear-attention model (configs/linear.yaml) and register picollm-linear
	$(BIN)/picollm train configs/linear.yaml $(ARGS)

train-ddp: setup ## Train CONFIG (default configs/linear.yaml) with DDP on NPROC processes (torchrun, gloo/nccl)
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m pipelines.cli train $(CONFIG) $(ARGS)

dpo: setup ## SFT a reference on TinyStories, then DPO it (configs/dpo.yaml); registers picollm-sft and picollm-dpo
	$(BIN)/picollm dpo configs/dpo.yaml $(ARGS)

compare: setup ## Softmax vs linear over 5 seeds each (configs/compare.yaml): metrics with CIs, report, one MLflow parent run
	$(BIN)/picollm compare configs/compare.yaml $(ARGS)

learning-curve: setup ## Test accuracy vs training-set size for both attentions (configs/learning_curve.yaml)
	$(BIN)/picollm compare configs/learning_curve.yaml $(ARGS)

new-rules: setup ## Rule generalisation: test steps/ratios never in training, both attentions (configs/new_rules.yaml)
	$(BIN)/picollm compare configs/new_rules.yaml $(ARGS)

recall: setup ## MQAR recall study (Zoology's MQAR): softmax vs linear with short convs, lr grid, 5 seeds (configs/recall.yaml)
	$(BIN)/picollm compare configs/recall.yaml $(ARGS)

analyze: setup ## Interpretability report of MODEL (embeddings, attention, neurons, ablation, patching, logit lens, probes, heads, HTML view)
	$(BIN)/picollm analyze "$(MODEL)" $(ARGS)

generate: setup ## Continue PROMPT with MODEL (default picollm-linear@champion)
	$(BIN)/picollm generate "$(MODEL)" "$(PROMPT)"

models: setup ## List registered models
	$(BIN)/picollm models list

ui: setup ## MLflow UI on ./mlflow.db, lean (one worker, no job runner); prints the runs-table URL
	@$(BIN)/python -m pipelines.ui_url "$(MLFLOW_TRACKING_URI)" "http://127.0.0.1:$(UI_PORT)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" \
	  --host 127.0.0.1 --port $(UI_PORT) --workers 1

# MODEL is read as every picollm command reads a reference (a bare NAME is its latest version; one error line
# if it names nothing), then served. `mlflow models serve --env-manager local` starts uvicorn by name: .venv/bin
# must be on PATH. The served model's limits: PICOLLM_SERVE_* (docs/commands.md#serving-over-rest).
serve: setup ## Serve MODEL (default picollm-linear@champion) as REST on 127.0.0.1:PORT (default 5002), foreground
	@uri="$$(MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" $(BIN)/python -m pipelines.model_uri "$(MODEL)")" || exit 2; \
	echo "serving $$uri on http://127.0.0.1:$(PORT)"; \
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
	  exec $(BIN)/mlflow models serve -m "$$uri" --env-manager local --host 127.0.0.1 --port $(PORT) --workers 1

# A fresh store in a temp dir: make train-linear's and compare_tiny's runs, `mlflow ui` on a free port, headless
# Chromium on the URLs they print (ARGS="--train configs/tiny.yaml" for a quicker refresh).
screenshots: setup ## Refresh docs/img/*.png (docs/first_ten_minutes.md) with headless Chromium from the printed URLs
	HF_HUB_OFFLINE=1 $(BIN)/python -m pipelines.screenshots $(ARGS)

test: setup ## Run the test suite (offline, CPU, a few minutes)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

test-integration: setup ## Multi-process tests: PostgreSQL + mlflow server, torchrun DDP, serving, racing workers (installs postgresql if missing)
	@$(PG_INSTALL)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m integration tests $(ARGS)

server: setup ## Start the team MLflow server (PostgreSQL backend) on http://127.0.0.1:5001 (configs/server.yaml)
	@$(PG_INSTALL)
	$(BIN)/picollm server start configs/server.yaml $(ARGS)

server-stop: setup ## Stop the server started by make server (mlflow and PostgreSQL, by PID)
	$(BIN)/picollm server stop configs/server.yaml $(ARGS)

lint: setup ## ruff check + format check
	$(BIN)/ruff check picollm pipelines tests docs
	$(BIN)/ruff format --check picollm pipelines tests docs

bench: setup ## Time training steps of both attentions at several lengths, logged to MLflow
	$(BIN)/picollm bench configs/bench.yaml $(ARGS)

sweep: setup ## Optuna sweep of learning rate x positional encoding (configs/sweep.yaml): parent run + a child per trial
	$(BIN)/picollm sweep configs/sweep.yaml $(ARGS)

docs: setup ## Regenerate docs/reference (config keys from the schemas, token mixers from the registry)
	$(BIN)/python -m pipelines.docs $(ARGS)

lock: setup ## Refresh requirements.lock from the current environment
	@(echo "# Every package's version, from 'pip freeze' of a working environment (make lock)."; \
	  echo "torch==2.13.0"; $(BIN)/pip freeze --exclude-editable | grep -vE '^(picollm|torch)==') > requirements.lock

clean: ## Remove the environment and caches (keeps mlflow.db and mlruns/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
