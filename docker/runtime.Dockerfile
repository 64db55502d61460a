# The runtime image: node agent, checkpoint loader, tiered cache and instance processes. A node
# runs each function instance in a container of this image (or of a function image built FROM
# it, runtime/container/function.Dockerfile). Python packages come from a lock made by
# `make lock`, at its pinned versions: only the extras asked for (EXTRAS), not the whole lock.
#
# GPU nodes (the defaults: requirements-cuda.lock, whose torch comes from PyPI with the CUDA
# runtime libraries as nvidia-* wheels, so the base needs no CUDA; the host's driver comes in
# through the NVIDIA container toolkit):
#   podman build -f docker/runtime.Dockerfile -t sllm-runtime .
# CPU nodes (requirements.lock; its torch==2.13.0+cpu is not on PyPI, so the directory holding
# the wheel is given as the "wheels" build context and bind-mounted for the install only):
#   podman build -f docker/runtime.Dockerfile -t sllm-runtime \
#     --build-arg LOCK=requirements.lock --build-context wheels=/opt/wheels .
# (docker buildx takes the same --build-context flag.) Both locks are resolved for Python 3.11:
# the base must have it (Debian bookworm's python3 is 3.11).
ARG BASE_IMAGE=python:3.11-slim

# Empty unless --build-context wheels=DIR replaces it.
FROM scratch AS wheels

FROM ${BASE_IMAGE}
ARG LOCK=requirements-cuda.lock
ARG EXTRAS=runtime

# PIP_CERT/SSL_CERT_FILE: pip and uv verify TLS with the system bundle (not their own copies),
# so a bundle mounted over it at build time (podman build --volume) is the one used.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_PYTHON=/opt/venv/bin/python \
    UV_LINK_MODE=copy \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    SLLM_CACHE_DIR=/var/cache/sllm

# python3 with venv: already in Debian-based Python images; installed on a Debian base without.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /opt/sllm
# The lock the image was made from stays at a fixed name: function images install their
# requirements against it (pinned packages keep their versions).
COPY ${LOCK} ./requirements.lock
COPY pyproject.toml README.md ./
# uv at the lock's version, then the extras' dependencies at the lock's versions. This layer
# changes only with the lock and pyproject.toml, not with the source.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,from=wheels,target=/wheels \
    pip install -q "$(grep -o '^uv==[^ ]*' requirements.lock)" \
    && uv pip install -q -c requirements.lock --find-links /wheels setuptools \
       -r pyproject.toml $(for e in $(echo "$EXTRAS" | tr , ' '); do echo --extra "$e"; done)
COPY sllm ./sllm
COPY sllm_cli ./sllm_cli
COPY sllm_sim ./sllm_sim
COPY gateway ./gateway
COPY runtime ./runtime
RUN uv pip install -q --no-deps --no-build-isolation . && rm -rf build *.egg-info

VOLUME /var/cache/sllm
CMD ["sllm", "node", "start"]
