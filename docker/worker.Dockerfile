# syntax=docker/dockerfile:1
# The GPU worker: loads the model once and drains the RQ queue.
#
# BASE_IMAGE defaults to the CUDA PyTorch image, whose torch satisfies the project's pin
# (torch>=2.3,<=2.13.0) and is kept as it is. docker-compose.cpu.yml passes
# BASE_IMAGE=python:3.11-slim instead; a base without torch gets the CPU build of
# TORCH_CPU_VERSION from the PyTorch CPU index, never a CUDA wheel from PyPI.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t ddim-worker .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_CPU_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# 1. torch: the base image's if it has one, else the CPU build. Then pin exactly the torch
#    now installed as a pip constraint, so that installing the project can never replace
#    it (pip fails instead of swapping in another build).
RUN if ! python -c "import torch" >/dev/null 2>&1; then \
        pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_CPU_VERSION}"; \
    fi \
 && python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /etc/torch-constraint.txt \
 && cat /etc/torch-constraint.txt

WORKDIR /app

# 2. The project with the worker extra (diffusers, transformers, safetensors, ...).
COPY pyproject.toml ./
COPY ddim_inversion ./ddim_inversion
COPY ddim_inversion_cli ./ddim_inversion_cli
COPY worker ./worker
RUN pip install --no-cache-dir --constraint /etc/torch-constraint.txt ".[worker]" \
 && rm -rf build ./*.egg-info \
 && python -c "import torch, diffusers, worker.engine.dispatch; print('torch', torch.__version__)"

# 3. A non-root user that owns only the model cache. /cache is a volume so that the hub
#    download (HF_HOME) and the generated tiny model survive container restarts and are
#    shared by every worker replica using the same volume.
RUN (getent group 10001 >/dev/null || groupadd --system --gid 10001 inversion) \
 && useradd --system --uid 10001 --gid 10001 --home-dir /cache --no-create-home \
        --shell /usr/sbin/nologin inversion \
 && mkdir -p /cache/huggingface /cache/ddim-inversion \
 && chown -R 10001:10001 /cache

ENV HF_HOME=/cache/huggingface \
    INVERSION_MODEL_CACHE_DIR=/cache/ddim-inversion \
    INVERSION_ALLOW_DOWNLOAD=true \
    INVERSION_DEVICE=cuda

VOLUME /cache
USER 10001:10001

CMD ["ddim-invert", "worker"]
