# fedalign's app image: a Flower image at the pinned version, with fedalign and its dependencies.
# One image serves both sides: the server side runs the ServerApp in it, every silo runs its
# ClientApp in it, and the one-shot services (data, certs, register, submit) run `fedalign`. It
# also carries flower-superlink and flower-supernode, so it can stand in for Flower's own images.
#
#   docker build -f docker/app.Dockerfile -t fedalign/app .                     # CUDA torch
#   docker build -f docker/app.Dockerfile --build-arg TORCH_INDEX_URL=... .      # CPU-only torch
#
# Where no image registry is reachable, `make image-base` builds a base from Debian packages
# alone and the build takes it through BASE_IMAGE (docs/containers.md, "With Podman, and without
# a registry").
ARG FLWR_VERSION=1.39.0
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

# Empty: torch from the default package index (a CUDA build, about 5 GB, that uses a GPU when
# one is present). Edge silos without a GPU: PyTorch's own CPU-only wheel index (under 1 GB).
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.14.1
# Empty: no torchvision (only resnet18 and the torchvision data source need it), for a torch
# build that has no matching torchvision.
ARG TORCHVISION_VERSION=0.29.1
# Certificate authorities (PEM text) that pip must trust during the build, e.g. a proxy's that
# re-signs the package index. Empty: the image's own trust store only.
ARG EXTRA_CA_CERTS=""
# A folder inside the build where pip looks for wheels first, e.g. one mounted with
# `podman build -v HOST_DIR:/wheels:ro` (WHEELS=/wheels). Empty: the package index only.
ARG WHEELS=""

# Everything below belongs to the base image's non-root user `app` (home /app).
COPY --chown=app:app pyproject.toml README.md /app/src/
COPY --chown=app:app fedalign /app/src/fedalign
COPY --chown=app:app server /app/src/server
COPY --chown=app:app client /app/src/client
COPY --chown=app:app strategies /app/src/strategies
COPY --chown=app:app cli /app/src/cli
COPY --chown=app:app conf /app/src/conf
WORKDIR /app/src

# The base images run as the non-root user `app`, UID 49999 (Flower's and `make image-base`'s).
USER 0
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/fedalign-build.crt \
        && update-ca-certificates; \
    fi
USER 49999

# Flower itself comes with the base image (its simulation extra, Ray, is not needed here). An
# editable install keeps conf/ next to the code, where `fedalign` looks for it.
RUN set -e; \
    if [ -n "$EXTRA_CA_CERTS" ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    if [ -n "$WHEELS" ]; then export PIP_FIND_LINKS="$WHEELS"; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    if [ -n "$TORCHVISION_VERSION" ]; then \
        python -m pip install --no-cache-dir "torch==$TORCH_VERSION" \
            "torchvision==$TORCHVISION_VERSION"; \
        extra="[vision]"; \
    else \
        python -m pip install --no-cache-dir "torch==$TORCH_VERSION"; \
        extra=""; \
    fi; \
    unset PIP_INDEX_URL; \
    sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml; \
    python -m pip install --no-cache-dir -e ".$extra"; \
    mkdir -p /app/data /app/state /app/outputs /app/certs

# Where a container keeps things (compose mounts volumes here): a silo's data (read-only) and its
# state between rounds, the server side's run folders, certificates.
ENV FEDALIGN_CACHE=/app/data \
    FEDALIGN_STATE_DIR=/app/state \
    FEDALIGN_OUTPUTS=/app/outputs \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    PYTHONUNBUFFERED=1

# An executor has no port of its own: healthy while the API it serves accepts connections.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "server.health"]

ENTRYPOINT ["flower-superexec"]
