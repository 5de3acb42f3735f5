# syntax=docker/dockerfile:1
# The base image is pinned by patch version and by the digest of its multi-architecture index. The
# digest is the one public projects pin for this tag; it could not be checked against Docker Hub from
# the machine this was written on (no registry access there): confirm it with
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm
# and update both lines together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# Build stage: the project's own wheel, and every dependency's wheel exactly as requirements.lock pins
# it (versions and sha256 hashes; `scripts/lock` regenerates it).
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md LICENSE MANIFEST.in ./
COPY receiver ./receiver
RUN pip download --no-cache-dir --require-hashes --only-binary=:all: -r requirements.lock -d /wheels \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Runtime stage: no build tools, no tests; a non-root user; data on a volume. The wheels are mounted
# for the one RUN that installs them, so they never become a layer of the image.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECEIVER_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin receiver \
    && mkdir -p /data && chown receiver:receiver /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    pip install --no-cache-dir --no-index --find-links=/wheels --require-hashes -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-index --no-deps /wheels/flux_receiver-*.whl
USER receiver
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
