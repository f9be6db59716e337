# fedalign — `make run` runs the main job, `make test` the test suite. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=
# pytest-xdist workers on 2 cores: the deployments wait on Flower's polling, so a third worker
# fills the gaps. Measured on a quiet machine, one after the other (one torch thread per worker,
# tests/conftest.py): 3 workers 10 min 36 s, 2 workers 11 min 32 s, 4 workers 10 min 30 s for
# the same suite (4: the CPU is full, more is lost to contention). Since then: 9 min 36 s on 3.
PYTEST_JOBS ?= 3

.PHONY: help install system-deps run simulate test test-fast lint format data montage grid results clean bench \
	compose-check compose-build compose-up compose-run compose-logs compose-down image-base \
	test-containers container-deps
PRESET ?= smoke

# Containers (docker/, docs/containers.md). TLS=1 adds the TLS + SuperNode authentication overlay.
# DOCKER_COMPOSE=podman-compose runs the same files with Podman.
DOCKER_COMPOSE ?= docker compose
CONTAINER_ENGINE ?= $(if $(findstring podman,$(DOCKER_COMPOSE)),podman,docker)
PROJECT ?= fedalign
SILOS   := mnist syn usps svhn mnistm
VOLUMES ?= docker/volumes
FEDALIGN_UID ?= $(shell id -u)
FEDALIGN_GID ?= $(shell id -g)
COMPOSE  = FEDALIGN_UID=$(FEDALIGN_UID) FEDALIGN_GID=$(FEDALIGN_GID) \
	FEDALIGN_VOLUMES=$(abspath $(VOLUMES)) $(DOCKER_COMPOSE) -p $(PROJECT) \
	-f docker/compose.yml $(if $(TLS),-f docker/compose.tls.yml)
# Building docker/app.Dockerfile (each empty by default): BASE_IMAGE (e.g. the one `make
# image-base` builds), TORCH_VERSION, TORCHVISION_VERSION (`none`: leave torchvision out),
# TORCH_INDEX_URL, EXTRA_CA_DIR (a folder of .crt files pip must trust while building) and, with
# Podman, WHEELS (a host folder of wheels that pip takes first). FLWR_IMAGE_PREFIX: where the
# SuperLink and SuperNode images come from (default Flower's, `flwr`); with BASE_IMAGE set,
# compose-build tags the app image as those two, which it can stand in for.
FLWR_VERSION ?= 1.39.0
BASE_IMAGE_TAG := localhost/fedalign-base:bookworm
APP_IMAGE = $(or $(FEDALIGN_IMAGE),fedalign/app:latest)
BUILD_ARGS = $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	$(if $(TORCH_VERSION),--build-arg TORCH_VERSION=$(TORCH_VERSION)) \
	$(if $(TORCHVISION_VERSION),--build-arg TORCHVISION_VERSION=$(TORCHVISION_VERSION:none=)) \
	$(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	$(if $(EXTRA_CA_DIR),--build-arg "EXTRA_CA_CERTS=$$(cat $(EXTRA_CA_DIR)/*.crt)") \
	$(if $(WHEELS),--build-arg WHEELS=/wheels)
export BUILDAH_FORMAT := docker
# Podman 4.3 cannot start a container that `--requires` a running one, and runs no healthchecks:
# podman-compose starts the services without their depends_on, and each one waits for what it
# needs by itself (the SuperNodes and executors retry, register and submit take --wait).
PODMAN_UP_ARGS = $(if $(filter podman,$(CONTAINER_ENGINE)),--no-deps)

help:
	@echo "make run        real local federation (SuperLink + one SuperNode per silo), ARGS='key=value ...'"
	@echo "make simulate   the same config in Flower's simulation engine"
	@echo "make test       the full test suite (about 10 minutes on 2 cores)"
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
	@echo "make image-base     a base image from Debian packages, for hosts with no registry"
	@echo "make test-containers  build the images and run the compose federation with Podman"

$(BIN)/fedalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -e ".[vision,dev]"
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

# One file at a time per worker (a module's fixtures, such as tests/test_e2e.py's deployment, are
# made once), in collection order: tests/conftest.py puts the files with deployments first.
XDIST = -n $(PYTEST_JOBS) --dist loadfile --no-loadscope-reorder
test: install system-deps
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not e2e" $(PYTEST_ARGS)

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

# Podman keeps HEALTHCHECK only in Docker's image format (BUILDAH_FORMAT above); one build
# serves every service that runs the app image.
compose-build:
	$(COMPOSE) $(if $(WHEELS),--podman-build-args='-v $(abspath $(WHEELS)):/wheels:ro') \
		build $(BUILD_ARGS) serverapp
	$(if $(BASE_IMAGE),$(foreach role,superlink supernode,$(CONTAINER_ENGINE) tag $(APP_IMAGE) \
		$(or $(FLWR_IMAGE_PREFIX),flwr)/$(role):$(FLWR_VERSION) &&) true)

# A base image from Debian packages alone, where no registry is reachable (needs root,
# debootstrap and podman): then `make compose-build BASE_IMAGE=localhost/fedalign-base:bookworm`.
image-base:
	docker/build-base.sh $(BASE_IMAGE_TAG)

compose-up:
	mkdir -p $(VOLUMES)/outputs $(VOLUMES)/certs $(VOLUMES)/state/superlink \
		$(addprefix $(VOLUMES)/data/,$(SILOS)) $(addprefix $(VOLUMES)/state/,$(SILOS))
	$(if $(filter-out $(shell id -u),$(FEDALIGN_UID)),chown -R $(FEDALIGN_UID):$(FEDALIGN_GID) $(VOLUMES))
	$(COMPOSE) run --rm data
	$(if $(TLS),$(COMPOSE) run --rm certs)
	$(COMPOSE) up -d $(PODMAN_UP_ARGS)

compose-run:
	$(COMPOSE) --profile run run --rm submit $(ARGS)

compose-logs:
	$(COMPOSE) logs -f

compose-down:
	$(COMPOSE) down

# The container federation built and run for real with Podman (tests/test_podman.py, about 10
# minutes): root installs Podman, debootstrap and podman-compose first; elsewhere the test is
# skipped with the reason.
PODMAN_COMPOSE_VERSION := 1.6.0
container-deps: install
	@{ command -v podman >/dev/null && command -v debootstrap >/dev/null; } \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap \
			>/dev/null; } \
		|| echo "note: podman or debootstrap is not installed: the container test will be skipped"
	@$(BIN)/pip install --disable-pip-version-check -q podman-compose==$(PODMAN_COMPOSE_VERSION) \
		|| echo "note: podman-compose is not installed: the container test will be skipped"

test-containers: install container-deps
	$(BIN)/python -m pytest -s -rA --containers tests/test_podman.py $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache .ruff_cache
