"""A worker process (``python -m asgi_supervise.worker``): one uvicorn event loop.

Nothing here imports the master, the settings model or `observe`: it runs in every
worker, and import-linter holds that line (pyproject.toml)."""
