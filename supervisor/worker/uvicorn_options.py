"""The settings that go to `uvicorn.Config` unchanged, named once.

The settings model (`config/settings.py`) defines each of them, with its type, default and
help; the worker (`server.uvicorn_config`) passes exactly these through. Settings uvicorn
also knows but which asgi-supervise handles itself (binding, workers, reload, logging
config, proxy headers, response headers) are not here. Plain names: the worker imports
no pydantic.
"""

from __future__ import annotations

PASSED_AS_IS = (
    # the app
    "interface",
    "lifespan",
    "env_file",
    "root_path",
    # the server
    "loop",
    "http",
    "http2",
    "reset_contextvars",
    "backlog",
    "limit_concurrency",
    "timeout_keep_alive",
    "h11_max_incomplete_event_size",
    "server_header",
    "date_header",
    # WebSockets
    "ws",
    "ws_max_size",
    "ws_max_queue",
    "ws_ping_interval",
    "ws_ping_timeout",
    "ws_per_message_deflate",
    # TLS
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_keyfile_password",
    "ssl_ca_certs",
    "ssl_version",
    "ssl_cert_reqs",
    "ssl_ciphers",
    # logging (the worker configures handlers itself: log_config is not passed)
    "log_level",
    "access_log",
    "use_colors",
)
