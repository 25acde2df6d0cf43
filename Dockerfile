# syntax=docker/dockerfile:1
# pricegate: one image for both roles.
#   docker build -t pricegate:0.1.0 .
#   docker run --rm -p 8000:8000 pricegate:0.1.0 demo                  # embedded default, no Redis
#   docker run --rm -p 8000:8000 -e PRICEGATE_REDIS_URL=redis://redis:6379/0 pricegate:0.1.0            # gateway
#   docker run --rm -p 9108:9108 -e PRICEGATE_REDIS_URL=redis://redis:6379/0 pricegate:0.1.0 ingest     # ingest
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a venv with pricegate and its dependencies (all ship manylinux wheels: no compiler needed) ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/pricegate
WORKDIR /src
# The runtime dependencies exactly as locked: every version pinned, every file checked against its hash, wheels
# only. A layer of its own, so a code change does not reinstall them. Regenerate the lock after changing
# [project] dependencies (README "Container image"; tests/test_packaging.py checks it covers them).
COPY requirements.lock ./
RUN /opt/pricegate/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
# Only what the wheel is built from (pyproject's [tool.hatch.build.targets.wheel] packages, the readme, the license).
COPY pyproject.toml README.md LICENSE ./
COPY shared ./shared
COPY gateway ./gateway
COPY ingest ./ingest
COPY pricegate_cli ./pricegate_cli
# pricegate itself, without resolving anything more (--no-deps; pip check fails if the lock misses a dependency).
# A regular (non-editable) install; pip byte-compiles here, so the read-only runtime never writes .pyc files.
RUN /opt/pricegate/bin/pip install --no-deps . \
 && /opt/pricegate/bin/pip check \
 && /opt/pricegate/bin/pricegate --help >/dev/null

# ---- runtime: the venv, a non-root user, nothing else ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/pricegate/bin:$PATH \
    PRICEGATE_HOST=0.0.0.0
RUN groupadd --system --gid 10001 pricegate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pricegate
COPY --from=builder /opt/pricegate /opt/pricegate
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 8000: gateway HTTP/WebSocket (PRICEGATE_PORT); 9108: ingest /metrics (PRICEGATE_INGEST_METRICS_PORT).
EXPOSE 8000 9108
# For plain Docker only (Kubernetes ignores HEALTHCHECK and uses the probes in k8s/): a gateway answers /livez
# on PRICEGATE_PORT; an ingest accepts connections on its metrics port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-c", "import os, socket, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PRICEGATE_PORT', '8000'), timeout=2)\nexcept OSError:\n    socket.create_connection(('127.0.0.1', int(os.environ.get('PRICEGATE_INGEST_METRICS_PORT', '9108'))), 2)\n"]
# Exec form: the pricegate process is PID 1 and receives SIGTERM itself (gateway: 1001 drain; ingest: stop).
ENTRYPOINT ["pricegate"]
CMD ["gateway"]
