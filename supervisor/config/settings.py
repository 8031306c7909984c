"""The one settings model: every option asgi-supervise has, defined once.

Command-line flags, ``ASGI_SUPERVISE_*`` environment variables, config-file keys and
profile keys are all derived from the fields below (see ``sources.py`` and ``cli.py``),
so adding an option means adding one field here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from asgi_supervise.config import tls
from asgi_supervise.config.values import Values, hide

ENV_PREFIX = "ASGI_SUPERVISE_"


def _split_commas(value: Any) -> Any:
    """Items arrive as TOML arrays, comma-separated strings (env) or repeated flags, and
    each string may hold several: `--forwarded-allow-ips 10.0.0.1,10.0.0.2`."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [part.strip() for item in value for part in item.split(",") if part.strip()]
    return value


def _one_item(value: Any) -> Any:
    """Items that may contain commas (a header value may): one string is one item."""
    return [value] if isinstance(value, str) else value


CommaList = Annotated[list[str], BeforeValidator(_split_commas)]
ItemList = Annotated[list[str], BeforeValidator(_one_item)]
WorkerCount = Annotated[int, Field(ge=1)] | Literal["auto"]


def opt(
    default: Any,
    help: str,
    group: str,
    *,
    secret: bool = False,
    aliases: tuple[str, ...] = (),
    bind_aliases: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    """A settings field with the metadata the CLI and `config` output need.

    `aliases` are extra flag spellings, mostly uvicorn's, so `uvicorn --workers ...`
    becomes `asgi-supervise --workers ...` with nothing else changed; gunicorn's short ones
    (`-w`) too. `bind_aliases` are gunicorn's `--bind`: one flag that sets the address
    fields, HOST:PORT (host and port) or unix:PATH (uds).
    """
    extra = {"group": group, "secret": secret, "aliases": list(aliases)}
    if bind_aliases:
        extra["bind_aliases"] = list(bind_aliases)
    return Field(default, description=help, json_schema_extra=extra, **kw)


class Settings(BaseModel):
    """Effective configuration of one asgi-supervise instance."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- application -------------------------------------------------------------------
    app: str | None = opt(None, "The ASGI app as module:attribute.", "app")
    factory: bool = opt(False, "Treat APP as a factory: call it to get the app.", "app")
    app_dir: str = opt(".", "Directory added to sys.path before importing the app.", "app")
    env_file: str | None = opt(None, "A .env file whose variables the app sees.", "app")
    lifespan: Literal["auto", "on", "off"] = opt("auto", "ASGI lifespan handling.", "app")
    worker_start: Literal["fork", "exec"] = opt(
        "fork",
        "How workers start: forked from a fork server (one per code generation, reloads "
        "start a new one), or each a fresh interpreter (exec: for apps that cannot be forked).",
        "app",
    )
    preload: bool = opt(
        False,
        "Import the app once in the fork server, before forking workers: its memory is "
        "shared copy-on-write and its import-time code runs once (needs --worker-start fork).",
        "app",
    )

    gunicorn_config: str | None = opt(
        None,
        "A gunicorn config file (gunicorn.conf.py) to read settings from, as gunicorn reads "
        "it; each setting with no equivalent is named in a warning.",
        "app",
    )

    # --- binding -------------------------------------------------------------------------
    host: str = opt("127.0.0.1", "Address to bind.", "bind", bind_aliases=("-b", "--bind"))
    port: int = opt(8000, "Port to bind (0 picks a free one).", "bind", ge=0, le=65535)
    uds: str | None = opt(None, "Bind a Unix domain socket instead of host:port.", "bind")
    fd: int | None = opt(None, "Serve on an already-open listening file descriptor.", "bind", ge=0)
    backlog: int = opt(2048, "Listen queue length of the shared socket.", "bind", ge=1, le=65535)

    # --- uvicorn server ------------------------------------------------------------------
    loop: Literal["auto", "asyncio", "uvloop", "none"] = opt("auto", "Event loop.", "server")
    http: Literal["auto", "h11", "httptools", "zttp"] = opt(
        "auto", "HTTP implementation.", "server"
    )
    http2: bool = opt(False, "Enable HTTP/2 (needs --http zttp).", "server")
    interface: Literal["auto", "asgi3", "asgi2", "wsgi"] = opt(
        "auto", "The application interface.", "app"
    )
    reset_contextvars: bool = opt(
        False, "Run each request in a fresh contextvars.Context.", "server"
    )
    ws: Literal["auto", "none", "websockets", "websockets-sansio", "wsproto"] = opt(
        "auto", "WebSocket implementation.", "server"
    )
    ws_max_size: int = opt(16 * 1024 * 1024, "Largest WebSocket message in bytes.", "server", ge=1)
    ws_max_queue: int = opt(32, "WebSocket incoming message queue length.", "server", ge=1)
    ws_ping_interval: float | None = opt(20.0, "Seconds between WebSocket pings.", "server", ge=0)
    ws_ping_timeout: float | None = opt(20.0, "Seconds to wait for a pong.", "server", ge=0)
    ws_per_message_deflate: bool = opt(True, "WebSocket per-message deflate.", "server")
    timeout_keep_alive: float = opt(
        5.0,
        "Close idle keep-alive connections after N s.",
        "server",
        aliases=("--keep-alive",),  # gunicorn's
        gt=0,
    )
    timeout_request_header: float = opt(
        10.0,
        "Close a connection whose request headers are not all in N s after it opened, or "
        "after the first byte of its next request on keep-alive (idle and slowloris clients).",
        "server",
        gt=0,
    )
    limit_concurrency: int | None = opt(
        None, "Answer 503 above this many connections or tasks per worker.", "server", ge=1
    )
    h11_max_incomplete_event_size: int | None = opt(
        None, "h11 buffer limit in bytes.", "server", ge=1
    )
    root_path: str = opt("", "ASGI root_path, for apps mounted below a path prefix.", "server")
    proxy_headers: bool = opt(True, "Trust X-Forwarded-* from --forwarded-allow-ips.", "server")
    forwarded_allow_ips: CommaList = opt(
        ["127.0.0.1"], "Addresses whose proxy headers are trusted.", "server"
    )
    server_header: bool = opt(True, "Send the Server header.", "server")
    date_header: bool = opt(True, "Send the Date header.", "server")
    headers: ItemList = opt(
        [],
        "An extra response header, 'Name: value' (repeat the flag for more).",
        "server",
        aliases=("--header",),
    )
    ssl_keyfile: str | None = opt(None, "TLS private key file.", "tls")
    ssl_certfile: str | None = opt(None, "TLS certificate file.", "tls")
    ssl_keyfile_password: str | None = opt(None, "Password of the TLS key.", "tls", secret=True)
    ssl_ca_certs: str | None = opt(None, "CA certificates file.", "tls")
    ssl_version: int = opt(17, "TLS protocol (stdlib ssl constant; 17 = TLS server).", "tls")
    ssl_cert_reqs: int = opt(
        0, "Client certificates: 0 none, 1 optional, 2 required.", "tls", ge=0, le=2
    )
    ssl_ciphers: str = opt("TLSv1", "TLS ciphers.", "tls")

    # --- logging -------------------------------------------------------------------------
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = opt(
        "info", "Log level of master and workers.", "logging"
    )
    log_config: str | None = opt(
        None, "Logging config file (.json, .yaml, .ini), instead of --log-format.", "logging"
    )
    log_format: Literal["text", "json"] = opt(
        "text", "Log lines for humans or for collectors.", "logging"
    )
    access_log: bool = opt(True, "Log one line per request.", "logging")
    log_file: str | None = opt(
        None, "Append logs here instead of stderr; SIGUSR1 reopens it (logrotate).", "logging"
    )
    use_colors: bool | None = opt(None, "Colour text logs (default: when a terminal).", "logging")

    # --- workers -------------------------------------------------------------------------
    workers: WorkerCount = opt(
        1,
        "Worker processes, or 'auto' to size from CPU, memory and DB.",
        "workers",
        aliases=("-w",),
    )
    engine: Literal["asgi-supervise", "gunicorn"] = opt(
        "asgi-supervise",
        "The master: asgi-supervise's own, or gunicorn's arbiter running the same Uvicorn "
        "workers (README: engines).",
        "workers",
    )
    min_workers: int = opt(1, "Never size 'auto' below this.", "workers", ge=1)
    max_workers: int | None = opt(None, "Never size 'auto' above this.", "workers", ge=1)
    worker_timeout: float = opt(
        30.0,
        "Kill a worker whose event loop is silent this long.",
        "workers",
        aliases=("--timeout",),  # gunicorn's: the silent worker's deadline
        gt=0,
    )
    ready_timeout: float = opt(
        60.0, "Longest a worker may take to finish startup.", "workers", gt=0
    )
    boot_failure_limit: int = opt(
        3, "Stop after this many consecutive workers fail to start.", "workers", ge=1
    )
    restart_backoff_max: float = opt(
        30.0, "Cap of the crash-respawn delay in seconds.", "workers", ge=0
    )

    pid_file: str | None = opt(
        None,
        "Write the master's pid here (for kill -HUP); removed on exit.",
        "workers",
        aliases=("--pid",),
    )
    control_socket: str | None = opt(
        None,
        "Unix socket (mode 0600) for `status`, `reload`, `scale` and `stop` (default: the "
        "pid file's path with .sock, else $XDG_RUNTIME_DIR/asgi-supervise/master-PID.sock, "
        "else TMPDIR/asgi-supervise-UID/master-PID.sock).",
        "workers",
    )

    # --- shutdown and drain --------------------------------------------------------------
    graceful_timeout: float = opt(
        15.0,
        "Seconds in-flight requests get to finish once a worker drains; what still runs "
        "then is cancelled and the app's lifespan shutdown runs.",
        "drain",
        aliases=("--timeout-graceful-shutdown",),
        ge=0,
    )
    idle_drain_grace: float = opt(
        1.0,
        "Seconds a draining worker keeps an idle keep-alive connection, counted from its "
        "last response, for the client's next request (answered with Connection: close); "
        "idle longer, it is closed. Clients reuse their most recent connections first: one "
        "idle this long is not about to carry a request. Capped by --timeout-keep-alive.",
        "drain",
        ge=0,
    )
    stream_drain_grace: float = opt(
        0.5,
        "Seconds after a worker starts draining before streaming responses (SSE, chunked) "
        "get http.disconnect and end cleanly.",
        "drain",
        ge=0,
    )
    shutdown_timeout: float = opt(
        5.0,
        "Seconds the app's lifespan shutdown may take after the drain before the worker "
        "exits without it.",
        "drain",
        ge=0,
    )
    balance_connections: bool = opt(
        True,
        "Pause accepting in a worker holding clearly more than its share of open "
        "connections, so long-lived ones spread evenly.",
        "drain",
    )
    drain_delay: float = opt(
        0.0, "Seconds to keep serving after SIGTERM while load balancers deregister.", "drain", ge=0
    )

    # --- reload and recycling ------------------------------------------------------------
    reload_surge: int = opt(
        1,
        "Workers allowed beyond --workers during reloads and recycling: replacements "
        "booting and old workers still draining both count (draining ones not with --reload).",
        "recycle",
        ge=1,
    )
    max_requests: int | None = opt(
        None,
        "Recycle a worker after this many requests.",
        "recycle",
        aliases=("--limit-max-requests",),
        ge=1,
    )
    max_requests_jitter: int = opt(
        0,
        "Random extra requests, so workers do not recycle together.",
        "recycle",
        aliases=("--limit-max-requests-jitter",),
        ge=0,
    )
    max_worker_memory: int | None = opt(
        None, "Recycle a worker above this RSS in MiB.", "recycle", ge=1
    )
    max_worker_lifetime: float | None = opt(
        None, "Recycle a worker after this many seconds.", "recycle", gt=0
    )
    max_worker_lifetime_jitter: float = opt(
        0.0, "Random extra lifetime in seconds.", "recycle", ge=0
    )

    # --- development ---------------------------------------------------------------------
    reload: bool = opt(
        False, "Restart workers when source files change (replacement first).", "dev"
    )
    reload_dirs: CommaList = opt(
        [], "Directories to watch (default: the app directory).", "dev", aliases=("--reload-dir",)
    )
    reload_includes: CommaList = opt(
        ["*.py"], "Glob patterns that trigger a reload.", "dev", aliases=("--reload-include",)
    )
    reload_excludes: CommaList = opt(
        [".*", "*.py[cod]", "*~", ".venv/*", "venv/*", "__pycache__/*"],
        "Glob patterns ignored.",
        "dev",
        aliases=("--reload-exclude",),
    )
    reload_delay: float = opt(
        0.05, "Quiet time that ends a burst of saves (one reload per burst), in s.", "dev", ge=0
    )

    # --- metrics and health --------------------------------------------------------------
    metrics: bool = opt(
        False, "Serve /metrics, /livez, /readyz and /status on their own port.", "observe"
    )
    metrics_host: str = opt("127.0.0.1", "Address of the metrics and health server.", "observe")
    metrics_port: int = opt(
        9808, "Port of the metrics and health server.", "observe", ge=0, le=65535
    )
    request_metrics: bool = opt(True, "Measure every request in the workers.", "observe")
    multiproc_dir: str | None = opt(
        None,
        "Where the master makes its private directory for worker metrics (default: the"
        " temp dir); it deletes nothing else there.",
        "observe",
    )
    min_ready: int = opt(
        1, "Workers that must be ready for /readyz to answer 200.", "observe", ge=1
    )

    # --- sizing inputs -------------------------------------------------------------------
    worker_memory_estimate: int = opt(
        256, "Expected RSS of one worker in MiB, for memory sizing.", "sizing", ge=1
    )
    cpu_workers_per_core: float = opt(
        1.0, "Workers per usable CPU when --workers auto.", "sizing", gt=0
    )
    db_max_connections: int | None = opt(None, "The database's max_connections.", "sizing", ge=1)
    db_reserved_connections: int = opt(
        0, "Connections kept for admins, migrations, other services.", "sizing", ge=0
    )
    db_pool_size: int | None = opt(
        None, "Connections one worker may hold (pool + overflow).", "sizing", ge=1
    )
    replicas: int = opt(1, "Instances sharing the database (e.g. the HPA maximum).", "sizing", ge=1)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML `workers = true` is a mistake, not 1: only bool fields take true/false."""
        if isinstance(value, bool) and info.field_name not in _BOOL_FIELDS:
            raise PydanticCustomError("bool_not_allowed", "a boolean is not allowed here")
        return value

    @field_validator("log_config", "env_file", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
    @classmethod
    def _file_exists(cls, path: str | None) -> str | None:
        """Caught here, a typo is a usage error; caught in a worker, it is a crash loop."""
        if path is not None and not os.path.isfile(path):
            raise ValueError("no such file")
        return path

    @field_validator("reload_dirs")
    @classmethod
    def _dirs_exist(cls, dirs: list[str]) -> list[str]:
        """A watch on a missing directory would claim to watch and never reload."""
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing:
            raise ValueError(f"no such directory: {', '.join(missing)}")
        return dirs

    @field_validator("headers")
    @classmethod
    def _headers_well_formed(cls, headers: list[str]) -> list[str]:
        for header in headers:
            name, colon, value = header.partition(":")
            if not colon or not _TOKEN.fullmatch(name.strip()):
                raise ValueError(f"{header!r} is not 'Name: value'")
            if "\r" in value or "\n" in value or not value.isascii():
                raise ValueError(f"{header!r}: the value must be one line of ASCII")
        return headers

    @field_validator("http", "loop", "ws")
    @classmethod
    def _implementation_installed(cls, choice: str, info: ValidationInfo) -> str:
        """uvicorn lists implementations whose package may be missing: say so here, once."""
        package = _NEEDS_PACKAGE.get(choice)
        if package and importlib.util.find_spec(package) is None:
            installed = [c for c in _CHOICES[str(info.field_name)] if _installed(c)]
            choices = ", ".join(map(repr, installed))
            message = f"expected one of {choices} ({choice!r} needs the {package} package)"
            raise PydanticCustomError("choice_not_installed", message)
        return choice

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        # ctx["fields"] lets `sources.py` say where each of the clashing values came from.
        binds = [name for name in ("uds", "fd") if getattr(self, name) is not None]
        if len(binds) > 1:
            raise _combination("--uds and --fd are mutually exclusive: pick one socket", *binds)
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise _combination(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})",
                "max_workers",
                "min_workers",
            )
        if self.preload and self.worker_start == "exec":
            raise _combination(
                "--preload imports the app in the fork server: it needs --worker-start fork",
                "preload",
                "worker_start",
            )
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise _combination(
                "TLS needs both ssl_keyfile and ssl_certfile", "ssl_keyfile", "ssl_certfile"
            )
        if self.ssl_certfile:
            problem = tls.check(self)
            if problem is not None:
                raise _problem(problem.message, *problem.fields)
        if self.http2 and self.http != "zttp":
            raise _combination("HTTP/2 needs --http zttp", "http2", "http")
        if isinstance(self.workers, int) and self.min_ready > self.workers:
            raise _problem(
                f"above the {self.workers} worker(s) there will be: /readyz could never answer 200",
                "min_ready",
                "workers",
            )
        if self.workers == "auto" and self.max_workers and self.min_ready > self.max_workers:
            raise _problem(
                f"above --max-workers {self.max_workers}: /readyz could never answer 200",
                "min_ready",
                "max_workers",
            )
        most, reserved = self.db_max_connections, self.db_reserved_connections
        if most is not None and reserved >= most:
            raise _problem(
                f"leaves none of the {most} database connections to the app",
                "db_reserved_connections",
                "db_max_connections",
            )
        return self


def _combination(message: str, *fields: str) -> PydanticCustomError:
    """An error about settings that do not go together, naming the fields involved."""
    # PydanticCustomError formats {placeholders} from ctx: keep literal braces out of it.
    text = message.replace("{", "(").replace("}", ")")
    return PydanticCustomError("settings_combination", text, {"fields": list(fields)})


def _problem(message: str, subject: str, *others: str) -> PydanticCustomError:
    """An error about one setting, given the others: `--min-ready=5 (...): message; got ...`."""
    text = message.replace("{", "(").replace("}", ")")
    ctx = {"fields": [subject, *others], "subject": subject}
    return PydanticCustomError("settings_combination", text, ctx)


# An HTTP header name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Implementations uvicorn offers whose package is optional.
_NEEDS_PACKAGE = {
    "httptools": "httptools",
    "zttp": "zttp",
    "uvloop": "uvloop",
    "websockets": "websockets",
    "websockets-sansio": "websockets",
    "wsproto": "wsproto",
}


def _installed(choice: str) -> bool:
    package = _NEEDS_PACKAGE.get(choice)
    return package is None or importlib.util.find_spec(package) is not None


FIELDS = Settings.model_fields
_BOOL_FIELDS = {
    name
    for name, field in FIELDS.items()
    if field.annotation is bool or bool in typing.get_args(field.annotation)
}
_CHOICES = {name: typing.get_args(FIELDS[name].annotation) for name in ("http", "loop", "ws")}


def meta(name: str) -> dict[str, Any]:
    extra = FIELDS[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def is_secret(name: str) -> bool:
    return bool(meta(name).get("secret"))


def redact(name: str, value: Any) -> Any:
    """Hide secrets: whole secret fields, and passwords inside URLs anywhere else."""
    return hide(value, is_secret(name))


SECRET = frozenset(name for name in FIELDS if is_secret(name))


def as_values(settings: Settings) -> Values:
    """The validated settings as plain data, for a process that does not import pydantic."""
    return Values(settings.model_dump(), SECRET)
