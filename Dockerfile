# An image for the bundled example; for your own app, see docs/kubernetes.md ("Your app's
# image"): build FROM this one, COPY your code into /app, and set CMD or the chart's `app`.
#
# Runs as any non-root uid (OpenShift's random ones too) with a read-only root
# filesystem: nothing is written outside TMPDIR (default /tmp), where the master keeps the
# workers' metrics files; mount a writable volume there (the Helm chart mounts an emptyDir).
ARG PYTHON_IMAGE=python:3.12-slim

# Build stage: a C compiler for the request meter (supervisor/worker/_meter.c), kept out of the image.
FROM ${PYTHON_IMAGE} AS build
# Pinning Debian package versions would break on every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
COPY profiles ./profiles
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "from asgi_supervise.worker import meter; \
assert meter.COMPILED, 'the C meter did not build'"

FROM ${PYTHON_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp

# The venv, owned by root and read-only to the app user: the code cannot be changed at run time.
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY examples ./examples
# uid 10001 by default; any other uid works as well (group 0, no home directory needed).
USER 10001:0

# 8000: the app. 9808: /metrics, /livez, /readyz, /status (the container profile).
EXPOSE 8000 9808
# Exec form: the master is PID 1, gets SIGTERM itself and reaps every child.
ENTRYPOINT ["asgi-supervise"]
CMD ["run", "examples.hello:app", "--profile", "container"]
