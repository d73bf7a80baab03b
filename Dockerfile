# syntax=docker/dockerfile:1
# Image for the `ingest` CLI (consumers, migrations, tooling).
#   docker build -t ingest:local .
#   docker run --rm ingest:local --help

# --- build: turn the project and its dependencies into wheels -----------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . /src
# Build wheels outside the work tree so a local .venv/ or build/ is never shipped.
RUN pip wheel --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INGEST_METRICS_HOST=0.0.0.0 \
    INGEST_METRICS_PORT=9108

# Equivalent of `pip install .`, from the wheels built above (no network needed).
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 ingest \
    && useradd --system --uid 10001 --gid ingest --no-create-home --shell /usr/sbin/nologin ingest

USER 10001:10001
WORKDIR /tmp
EXPOSE 9108
# SIGTERM -> graceful shutdown (finish/abandon batch, leave group) within 30 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingest"]
CMD ["--help"]
