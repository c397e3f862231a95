# Cluster image: CUDA-capable base; builds the same package as the CPU venv.
# On a CUDA machine training/cpu.py patches nothing.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/titan-supervisor
COPY pyproject.toml README.md requirements.lock ./
COPY supervisor ./supervisor
COPY training ./training
# The lock pins torch==2.13.0; from PyPI on Linux that is the CUDA build.
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.lock \
    && /opt/venv/bin/pip install --no-deps . && TITAN_ASSETS_DIR=/opt/titan-supervisor/assets /opt/venv/bin/python -m training.assets
ENV PATH=/opt/venv/bin:$PATH TITAN_ASSETS_DIR=/opt/titan-supervisor/assets
USER 1000:1000
ENTRYPOINT ["titan-supervisor"]
CMD ["run", "/etc/titan-supervisor/config.toml"]
