# An image for the bundled example; for your app, COPY it and change CMD's app string.

# Build stage: a C compiler for the request meter (supervisor/worker/_meter.c), kept out of the image.
FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
COPY profiles ./profiles
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 app
WORKDIR /app

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && python -c "from asgi_supervise.worker import meter; \
assert meter.COMPILED, 'the C meter did not build'"

COPY examples ./examples
USER 10001

# 8000: the app. 9808: /metrics, /livez, /readyz, /status (the container profile).
EXPOSE 8000 9808
# Exec form: the master is PID 1, gets SIGTERM itself and reaps every child.
ENTRYPOINT ["asgi-supervise"]
CMD ["examples.hello:app", "--profile", "container"]
