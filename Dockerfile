# An image for the bundled example; for your app, COPY it and change CMD's app string.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 app
WORKDIR /app

COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
COPY profiles ./profiles
RUN pip install .

COPY examples ./examples
USER 10001

# 8000: the app. 9808: /metrics, /livez, /readyz, /status (the container profile).
EXPOSE 8000 9808
# Exec form: the master is PID 1, gets SIGTERM itself and reaps every child.
ENTRYPOINT ["asgi-supervise"]
CMD ["examples.hello:app", "--profile", "container"]
