# Duragate gateway image: `docker build -t duragate .` then `docker run duragate` (runs `serve`).
# Deployment on a cluster (Dapr, Kubernetes): docs/deploy.md.
#
# Two stages: the first installs Duragate and its dependencies into a virtualenv, the second
# copies only that virtualenv (no pip cache, no build files) onto a fresh slim Python.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/duragate
WORKDIR /src
# Every top-level package of pyproject.toml's `packages.find.include` (tests/test_deploy_files.py
# checks that this list keeps up with it).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
COPY identity ./identity
COPY policies ./policies
COPY examples ./examples
# The extras to install: `demo` (LangGraph and CrewAI) serves the demo configuration below; an
# image for a deployment whose tools need none builds with `--build-arg EXTRAS=`.
ARG EXTRAS=demo
RUN /opt/duragate/bin/pip install ".${EXTRAS:+[$EXTRAS]}" && /opt/duragate/bin/duragate version


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/duragate/bin:$PATH

# A numeric user: Kubernetes' `runAsNonRoot` can only verify a numeric USER (config/k8s runs
# the pod as this uid and gid).
RUN groupadd --system --gid 10001 duragate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/duragate --create-home \
       --shell /usr/sbin/nologin duragate \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data

COPY --from=build /opt/duragate /opt/duragate
# The demo configuration and its policy file, for `docker run duragate` as it is. A deployment
# mounts its own configuration (config/k8s mounts config/dapr/gateway.yaml at /etc/duragate).
WORKDIR /app
COPY config/gateway.yaml ./config/gateway.yaml
COPY config/policies ./config/policies

# The data directory (the embedded engine's SQLite file) lives on a volume.
ENV DURAGATE_DATA_DIR=/data \
    DURAGATE_LOG_FORMAT=json \
    DURAGATE_HEALTHCHECK_URL=http://127.0.0.1:8770/readyz
VOLUME ["/data"]

USER 10001:10001

# The gateway's readiness endpoint (200 once the engine answers). Set DURAGATE_HEALTHCHECK_URL
# to the configured listen port, https:// when `listen.tls` is on: the check runs inside the
# container against its own loopback, so it does not verify the certificate.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; r = urllib.request.urlopen(os.environ['DURAGATE_HEALTHCHECK_URL'], timeout=4, context=ssl._create_unverified_context()); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: duragate is PID 1 and gets SIGTERM from `docker stop` (it shuts down cleanly).
ENTRYPOINT ["duragate"]
# The demo configuration listens on the container's loopback only (it allows anonymous
# callers); mount a configuration of your own (`--config`, or DURAGATE_CONFIG) to serve others.
CMD ["serve", "--config", "/app/config/gateway.yaml"]
