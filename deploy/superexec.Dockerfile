# The image of the SuperExec containers (docker-compose.yml): flwr/superexec with fedmerge and its
# dependencies installed, so the ServerApp and ClientApp processes it launches can import them.
#
# Assumptions about the base image (the test suite runs the same commands without docker;
# this image itself is not built by the tests):
# - flwr/superexec:${FLWR_VERSION} is Flower's image: a Python >= 3.11 virtual environment on PATH
#   that user `app` (uid 49999, HOME=/app, WORKDIR /app) may pip install into, flwr preinstalled;
# - torch comes from the CPU wheel index (a plain `pip install torch` pulls multi-GB CUDA wheels);
#   for GPUs set the build arg TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu126);
# - the flwr and ray requirement lines are dropped: flwr is the image's own (same version as the
#   SuperLink / SuperNode images) and ray is only for `fedmerge simulate --backend flower`.
# The app's code also travels in the FAB that `flwr run` submits (and is imported from there);
# this editable copy provides the dependencies and the `fedmerge` command (`fedmerge data info`).
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedmerge ./fedmerge
COPY --chown=app:app clients ./clients
COPY --chown=app:app server ./server
COPY --chown=app:app configs ./configs
RUN sed -i -e '/"flwr\[simulation\]/d' -e '/"ray>=/d' pyproject.toml \
    && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch>=2.5,<2.14" \
    && python -m pip install --no-cache-dir -e . \
    && mkdir -p /app/runs /app/.cache/fedmerge

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDMERGE_DATA=/app/.cache/fedmerge
ENTRYPOINT ["flower-superexec"]
