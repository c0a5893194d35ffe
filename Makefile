# flora developer commands. `make install` is idempotent: it re-installs only when
# pyproject.toml changes (or the virtualenv is missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flora-installed
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install run test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
	  $(BIN)/pip install --quiet $(TORCH_PAIR)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/flora fit --config configs/quickstart.yaml --trainer.overwrite true

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# Regenerates docs/backbone.md, results.md, ablation.md, cmfl.md, performance.md and scaling-bench.md (offline; each states its own run time).
bench: install
	$(BIN)/flora bench probe
	$(BIN)/flora bench accuracy
	$(BIN)/flora bench ablation
	$(BIN)/flora bench cmfl
	$(BIN)/flora bench speed
	$(BIN)/flora bench scaling

clean:
	rm -rf runs .pytest_cache build src/*.egg-info
