# Set-up is part of every target: a fresh machine needs only Python 3.11 and this folder.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# `flwr run .` on 10 simulated clients (8-bit training, moving average, FedAvg, MNIST).
demo: $(STAMP)
	$(BIN)/python -m scripts.flwr_local --num-supernodes 10

# The whole test suite (includes a real `flwr run` simulation on MNIST from DATA_ROOT).
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.quantization
	$(BIN)/python -m benchmarks.communication

clean:
	rm -rf $(VENV) .flwr_home .pytest_cache .ruff_cache
