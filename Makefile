# fedalign — `make run` runs the main job, `make test` the test suite. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: help install run simulate test test-fast lint format data montage grid results clean
PRESET ?= smoke

help:
	@echo "make run        real local federation (SuperLink + one SuperNode per silo), ARGS='key=value ...'"
	@echo "make simulate   the same config in Flower's simulation engine"
	@echo "make test       the full test suite (about 9 minutes on 2 cores)"
	@echo "make test-fast  the suite without the end-to-end process tests"
	@echo "make data       build/verify the offline Digits-5 cache;  make montage  picture of the domains"
	@echo "make grid       targets x methods x seeds, resumable: PRESET=smoke (minutes) or full"
	@echo "make results    regenerate docs/results*.md/.csv/.png from the run folders in results/"
	@echo "make lint       ruff check + format check"

$(BIN)/fedalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/fedalign

run: install
	$(BIN)/fedalign run $(ARGS)

simulate: install
	$(BIN)/fedalign simulate $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .

data: install
	$(BIN)/fedalign data build

montage: install
	$(BIN)/fedalign data montage --out outputs/digits5-montage.png

grid: install
	$(BIN)/fedalign grid $(PRESET)

results: install
	$(BIN)/fedalign results $(PRESET)

clean:
	rm -rf outputs .pytest_cache .ruff_cache
