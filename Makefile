# Consilia: `make sim` runs the default simulation, `make test` runs the whole test suite.
# Both create .venv on first use (needs only Python 3.11, gcc and make).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sim test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The registry's regular torch/torchvision pair (its torchvision imports on CPU-only hosts).
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

sim: $(STAMP)
	$(BIN)/fl-sim

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP) typecheck
	$(BIN)/ruff check .

# mypy reads the packages under their import names: link the folders as build/mypy/consilia/*.
typecheck: $(STAMP)
	mkdir -p build/mypy/consilia
	for d in common client server simulations; do ln -sfn ../../../$$d build/mypy/consilia/$$d; done
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.simulation

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
