# syntax=docker/dockerfile:1
# titan-supervisor images: one Dockerfile, two targets, both non-root, both installing the
# package from requirements.lock (the same pins CI tests).
#   docker build --target cpu  -t titan-supervisor:cpu  .   # CPU torch: the demo, the daemon alone
#   docker build --target cuda -t titan-supervisor:cuda .   # CUDA torch: trainer pods on GPU nodes
# The entrypoint is `titan-supervisor`: `run CONFIG` for the daemon (the default command) and
# `agent CONFIG` for the node agent in trainer pods (deploy/kubernetes/base/trainer-jobset.yaml).
# training/cpu.py patches nothing when CUDA is available, so both targets run the same code.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------- CPU: build the venv ----
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
# torch==2.13.0 in the lock matches the index's 2.13.0+cpu build, which is preferred here.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock
COPY supervisor ./supervisor
COPY training ./training
RUN /opt/venv/bin/pip install --no-deps . \
    && TITAN_ASSETS_DIR=/opt/titan-supervisor/assets /opt/venv/bin/python -m training.assets

# ---------------------------------------------------------------- CPU: runtime -----------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH TITAN_ASSETS_DIR=/opt/titan-supervisor/assets HF_DATASETS_OFFLINE=1
RUN groupadd --system --gid 10001 titan \
    && useradd --system --uid 10001 --gid titan --home-dir /var/lib/titan-supervisor --create-home titan
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/titan-supervisor/assets /opt/titan-supervisor/assets
WORKDIR /var/lib/titan-supervisor
USER 10001:10001
EXPOSE 8642
ENTRYPOINT ["titan-supervisor"]
CMD ["run", "/etc/titan-supervisor/config/config.toml"]

# ---------------------------------------------------------------- CUDA: base with Python 3.11
FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive
# Versions come from the pinned CUDA base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- CUDA: build the venv ---
FROM cuda-base AS build-cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
# From PyPI on Linux, torch==2.13.0 is the CUDA build (its nvidia-* wheels come with it).
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.lock
COPY supervisor ./supervisor
COPY training ./training
RUN /opt/venv/bin/pip install --no-deps . \
    && TITAN_ASSETS_DIR=/opt/titan-supervisor/assets /opt/venv/bin/python -m training.assets

# ---------------------------------------------------------------- CUDA: runtime ----------
FROM cuda-base AS cuda
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH TITAN_ASSETS_DIR=/opt/titan-supervisor/assets HF_DATASETS_OFFLINE=1
RUN groupadd --system --gid 10001 titan \
    && useradd --system --uid 10001 --gid titan --home-dir /var/lib/titan-supervisor --create-home titan
COPY --from=build-cuda /opt/venv /opt/venv
COPY --from=build-cuda /opt/titan-supervisor/assets /opt/titan-supervisor/assets
WORKDIR /var/lib/titan-supervisor
USER 10001:10001
EXPOSE 8642
ENTRYPOINT ["titan-supervisor"]
CMD ["run", "/etc/titan-supervisor/config/config.toml"]
