# Everything a fresh machine needs: `make test` and `make demo` create .venv, install torch first (pinned, a CPU
# build by default; override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PORT ?= 8000
DEMO_CHECKPOINT ?= checkpoints/demo

.PHONY: install install-demo lint test demo serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files keep re-runs fast; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[train,serve,client,demo,dev]"
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[train,serve,client,demo]"
	touch $@

install: $(VENV)/.installed-all

# ruff (configured in pyproject.toml): lint findings and unformatted files both fail.
lint: $(VENV)/.installed-all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

$(DEMO_CHECKPOINT)/reward_manifest.json: $(VENV)/.installed-demo
	$(BIN)/reward-train --output_dir $(DEMO_CHECKPOINT) --dataset_name demo --num_train_epochs 2 --learning_rate 5e-5

demo: $(DEMO_CHECKPOINT)/reward_manifest.json
	$(BIN)/reward-serve --model $(DEMO_CHECKPOINT) --host 127.0.0.1 --port $(PORT)

bench: $(VENV)/.installed-all
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
