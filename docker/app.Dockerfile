# fedalign's app image: Flower's SuperExec image at the pinned version, with fedalign and its
# dependencies. One image serves both sides: the server side runs the ServerApp in it, every silo
# runs its ClientApp in it, and the one-shot services (data, certs, submit) run `fedalign`.
# The SuperLink and the SuperNodes need no app code: they use Flower's own images unchanged.
#
#   docker build -f docker/app.Dockerfile -t fedalign/app .                    # CUDA torch
#   docker build -f docker/app.Dockerfile --build-arg TORCH_INDEX_URL=... .     # CPU-only torch
ARG FLWR_VERSION=1.39.0
FROM flwr/superexec:${FLWR_VERSION}

# Empty: torch from the default package index (a CUDA build, about 5 GB, that uses a GPU when
# one is present). Edge silos without a GPU: PyTorch's own CPU-only wheel index (under 1 GB),
# from which these versions (the ones our tests ran with) are taken.
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# The base image runs as the non-root user `app` (home /app); everything below belongs to it.
COPY --chown=app:app pyproject.toml README.md /app/src/
COPY --chown=app:app fedalign /app/src/fedalign
COPY --chown=app:app server /app/src/server
COPY --chown=app:app client /app/src/client
COPY --chown=app:app strategies /app/src/strategies
COPY --chown=app:app conf /app/src/conf
WORKDIR /app/src

# Flower itself comes with the base image (its simulation extra, Ray, is not needed here). An
# editable install keeps conf/ next to the code, where `fedalign` looks for it.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
            "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; \
    fi \
    && sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir -e . \
    && mkdir -p /app/data /app/state /app/outputs /app/certs

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
