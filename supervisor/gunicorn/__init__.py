"""The gunicorn engine: gunicorn's arbiter as the master, asgi-supervise's workers under it."""
