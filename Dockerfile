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
    DURAGATE_LOG_FORMAT=json
VOLUME ["/data"]

USER duragate

# The gateway's readiness endpoint (200 once the engine answers), on the port of the config.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8770/readyz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: duragate is PID 1 and gets SIGTERM from `docker stop` (it shuts down cleanly).
ENTRYPOINT ["duragate"]
# The demo configuration listens on the container's loopback only (it allows anonymous
# callers); mount a configuration of your own at /app/config to serve others.
CMD ["serve", "--config", "/app/config/gateway.yaml"]
