# syntax=docker/dockerfile:1
# Build stage: make a wheel of the project (and its dependencies) from its own metadata.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

# Runtime stage: no build tools, no tests; a non-root user; data on a volume.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECEIVER_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin receiver \
    && mkdir -p /data && chown receiver:receiver /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "receiver[fast]" && rm -rf /wheels
USER receiver
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
