# A function image: the sllm runtime image plus the function's Python packages
# (requirements.txt), installed against the runtime image's lock, so a package the runtime pins
# keeps its version. A node builds it when it first needs it, cached by content hash
# (runtime/container/images.py); by hand, in the function's folder:
#   podman build -t my-function --build-arg RUNTIME_IMAGE=sllm-runtime:latest .
ARG RUNTIME_IMAGE=sllm-runtime:latest
FROM ${RUNTIME_IMAGE}
COPY requirements.txt /opt/function/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -q -c /opt/sllm/requirements.lock -r /opt/function/requirements.txt
