# syntax=docker/dockerfile:1
# The HTTP gateway: FastAPI + uvicorn and the shared package (ddim_inversion: contract,
# parameters, Redis keys, image normaliser, webhook policy). No torch, no diffusers: only the `gateway` extra is installed, and the
# worker package is not copied.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t ddim-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Only what the gateway runs: the shared package, the CLI and service/.
COPY pyproject.toml ./
COPY ddim_inversion ./ddim_inversion
COPY ddim_inversion_cli ./ddim_inversion_cli
COPY service ./service

# A regular (non-editable) install into site-packages; the source tree stays root-owned
# and read-only for the runtime user. The in-tree build leftovers are removed.
RUN pip install --no-cache-dir ".[gateway]" \
 && rm -rf build ./*.egg-info \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin inversion

USER 10001:10001

# INVERSION_HOST/INVERSION_PORT are GatewaySettings.host/.port: listen on every interface
# of the container (the default 127.0.0.1 would be unreachable from outside it).
ENV INVERSION_HOST=0.0.0.0 \
    INVERSION_PORT=8000

EXPOSE 8000

# Liveness only (/healthz touches no Redis). slim has no curl: use the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["ddim-invert", "gateway"]
