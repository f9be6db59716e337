# fedalign — `make run` runs the main job, `make test` the test suite. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=
# pytest-xdist workers: the end-to-end tests mostly wait on Flower's polling. 3 workers were
# measured too: 14.3 and 16.7 min against 15.6 min for 2, and CPU-bound tests slowed sharply.
PYTEST_JOBS ?= 2

.PHONY: help install system-deps run simulate test test-fast lint format data montage grid results clean bench \
	compose-check compose-build compose-up compose-run compose-logs compose-down
PRESET ?= smoke

# Containers (docker/, docs/containers.md). TLS=1 adds the TLS + SuperNode authentication overlay.
DOCKER_COMPOSE ?= docker compose
SILOS   := mnist syn usps svhn mnistm
VOLUMES := docker/volumes
COMPOSE  = FEDALIGN_UID=$$(id -u) FEDALIGN_GID=$$(id -g) $(DOCKER_COMPOSE) -p fedalign \
	-f docker/compose.yml $(if $(TLS),-f docker/compose.tls.yml)

help:
	@echo "make run        real local federation (SuperLink + one SuperNode per silo), ARGS='key=value ...'"
	@echo "make simulate   the same config in Flower's simulation engine"
	@echo "make test       the full test suite (about 16 minutes on 2 cores)"
	@echo "make test-fast  the suite without the end-to-end process tests"
	@echo "make data       build/verify the offline Digits-5 cache;  make montage  picture of the domains"
	@echo "make grid       targets x methods x seeds, resumable: PRESET=smoke (a minute) or full;"
	@echo "                WORKERS=N cells at once (engine in-process; default one per core)"
	@echo "make results    regenerate docs/results*.md/.csv/.png from the run folders in results/"
	@echo "make bench      the performance benchmarks into docs/perf/ (about an hour; docs/performance.md)"
	@echo "make lint       ruff check + format check"
	@echo "make compose-build / compose-up / compose-run ARGS=... / compose-logs / compose-down"
	@echo "                the one-host container federation (TLS=1: with TLS + node auth)"
	@echo "make compose-check  static checks of docker/ (no Docker engine needed)"

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

# Debian's docker-compose validates the compose files and drives the container topology tests;
# installed when we may (root with apt-get), else those tests are skipped with a reason.
system-deps:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } \
		|| echo "note: docker-compose is not installed: the container checks will be skipped"

test: install system-deps
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) -m "not e2e" $(PYTEST_ARGS)

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
	$(BIN)/fedalign grid $(PRESET) $(if $(WORKERS),--workers $(WORKERS))

results: install
	$(BIN)/fedalign results $(PRESET)

# docs/performance.md: each script prints ratios measured side by side in its own run.
PERF := docs/perf
bench: install data
	$(BIN)/python bench/bench_overhead.py --rounds 6 --strategies fedavg fedka \
		--variants deployed flower-polling flower-stock in-process --out $(PERF)/overhead.json
	$(BIN)/python bench/bench_overhead.py --rounds 6 --strategies fedavg --variants earlier-polling \
		--out $(PERF)/overhead-earlier.json
	$(BIN)/python bench/bench_wire.py --out $(PERF)/wire.json
	$(BIN)/python bench/bench_merge.py --silos 10 --params 11_000_000 --out $(PERF)/merge.json
	$(BIN)/python bench/bench_startup.py --out $(PERF)/startup.json
	$(BIN)/python bench/bench_scale.py --engine simulation --silos 100 1000 \
		--out $(PERF)/scale.json --plot $(PERF)/scale.png
	$(BIN)/python bench/bench_scale.py --engine deployment --silos 4 12 24 52 \
		--out $(PERF)/scale.json --plot $(PERF)/scale.png

compose-check: install system-deps
	$(BIN)/python -m pytest -q tests/test_containers.py -m "not e2e"

compose-build:
	$(COMPOSE) build

compose-up:
	mkdir -p $(VOLUMES)/outputs $(VOLUMES)/certs $(VOLUMES)/state/superlink \
		$(addprefix $(VOLUMES)/data/,$(SILOS)) $(addprefix $(VOLUMES)/state/,$(SILOS))
	$(COMPOSE) up -d

compose-run:
	$(COMPOSE) run --rm submit $(ARGS)

compose-logs:
	$(COMPOSE) logs -f

compose-down:
	$(COMPOSE) down

clean:
	rm -rf outputs .pytest_cache .ruff_cache
