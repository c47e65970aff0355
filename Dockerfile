# Duragate gateway image: `docker build -t duragate .` then `docker run duragate` (runs `serve`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 duragate \
    && useradd --system --uid 10001 --gid duragate --home-dir /home/duragate --create-home \
       --shell /usr/sbin/nologin duragate \
    && mkdir -p /data \
    && chown duragate:duragate /data \
    && chmod 0700 /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
COPY identity ./identity
COPY policies ./policies
COPY examples ./examples
COPY config ./config
RUN pip install . && duragate version

# The data directory (the engine's SQLite file) lives on a volume.
ENV DURAGATE_DATA_DIR=/data \
    DURAGATE_LOG_FORMAT=json \
    DURAGATE_HEALTH_LISTEN=127.0.0.1:3500
VOLUME ["/data"]

USER duragate

# The embedded engine's health endpoint (GET /v1.0/healthz answers 204 when ready). It listens
# on the container's loopback, where the health check runs.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:3500/v1.0/healthz', timeout=4); sys.exit(0 if 200 <= r.status < 300 else 1)"]

# Exec form: duragate is PID 1 and gets SIGTERM from `docker stop` (it shuts down cleanly).
ENTRYPOINT ["duragate"]
CMD ["serve"]
