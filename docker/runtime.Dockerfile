# The runtime-node image: node agent, checkpoint loader, tiered cache, instances (torch with
# CUDA). One per GPU server; it needs the NVIDIA container toolkit (`--gpus all`).
# Build from the repository root:  docker build -f docker/runtime.Dockerfile -t sllm-runtime .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SLLM_CACHE_DIR=/var/cache/sllm

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/sllm
# torch from the package index's default Linux build, which is the CUDA one (constraints.txt
# pins the version).
COPY constraints.txt ./
RUN pip install -c constraints.txt torch
COPY pyproject.toml README.md ./
COPY sllm ./sllm
COPY gateway ./gateway
COPY runtime ./runtime
RUN pip install -c constraints.txt ".[runtime]"

VOLUME /var/cache/sllm
CMD ["sllm", "node", "start"]
