# Each target creates .venv when it is missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.14.1 and torchvision 0.29.1 are the releases this project is tested on.
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[vision,dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/singledir corrupted-labels --out runs/corrupted-labels

lint: $(STAMP)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)
	$(BIN)/ruff check src tests $(wildcard benchmarks)

format: $(STAMP)
	$(BIN)/ruff format src tests $(wildcard benchmarks)
	$(BIN)/ruff check --fix src tests $(wildcard benchmarks)

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
