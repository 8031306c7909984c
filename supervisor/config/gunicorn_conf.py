"""gunicorn's spellings of our settings: `--bind`, a `gunicorn.conf.py`, `GUNICORN_CMD_ARGS`.

A service moving off gunicorn keeps its config: the file and the variable are read by
gunicorn's own code (its `Application` executes the file, its `Config` parses the
variable and validates every value), and each setting that has an equivalent here
becomes that setting, in a layer of its own so `asgi-supervise config` names it as the
source. A setting with no equivalent (a server hook, a worker class, `umask`, ...) is
named in one note each, never dropped silently; one left at gunicorn's default asks
for nothing and is not named.

The mapping (`translate`) is pure; `read` is the part that runs gunicorn.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CMD_ARGS = "GUNICORN_CMD_ARGS"
ADDRESS = ("host", "port", "uds", "fd")  # what one gunicorn bind sets


class GunicornConfigError(Exception):
    """A gunicorn config that cannot be used: one line, exit 2."""


def parse_bind(value: str, *, fd: bool = False) -> dict[str, Any]:
    """gunicorn's bind address, HOST:PORT, [IPv6]:PORT, HOST, :PORT or unix:PATH, as the
    address settings (host, port, uds); `fd://N` too (fd) where `fd` is allowed. Raises
    ValueError saying what was expected."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path:
            raise ValueError("expected unix:PATH")
        return {"uds": path}
    if value.startswith("fd://"):
        number = value.removeprefix("fd://")
        if fd and number.isdigit():
            return {"fd": int(number)}
        raise ValueError("use --fd N for an inherited descriptor")
    host, port = value, None
    if value.startswith("["):  # [::1]:8000
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port is not None and not (port.isdigit() and int(port) <= 65535):
        raise ValueError("expected HOST:PORT with a port 0-65535, or unix:PATH")
    given: dict[str, Any] = {}
    if host:
        given["host"] = host
    if port is not None:
        given["port"] = port
    if not given:
        raise ValueError("expected HOST:PORT or unix:PATH")
    return given


# --- the mapping: gunicorn setting -> our settings ------------------------------------------

Mapped = dict[str, Any]


def _same(ours: str) -> Callable[[Any], Mapped]:
    return lambda value: {ours: value}


def _positive_or_never(ours: str, never: str) -> Callable[[Any], Mapped]:
    """gunicorn's 0 turns the feature off; ours has no off: the note says what 0 meant."""

    def convert(value: Any) -> Mapped:
        if value == 0:
            raise _NoEquivalent(never)
        return {ours: value}

    return convert


def _bind(addresses: list[str]) -> Mapped:
    if len(addresses) > 1:
        raise ValueError(
            "one master serves one listener: keep one address, or run a second instance for another"
        )
    return parse_bind(addresses[0], fd=True)


def _accesslog(value: str | None) -> Mapped:
    if value in (None, "-"):
        return {"access_log": value is not None}
    raise _NoEquivalent(
        "access-log is on, but access lines go where the other logs go (stderr or "
        "--log-file), not to a file of their own",
        {"access_log": True},
    )


def _worker_class(value: Any) -> Mapped:
    """Uvicorn's worker classes (and gunicorn's asgi one) are what runs here anyway."""
    name = value if isinstance(value, str) else getattr(value, "__name__", str(value))
    if name.endswith("UvicornH11Worker"):
        return {"http": "h11"}
    if name.endswith("UvicornWorker") or name == "asgi" or name.endswith("ASGIWorker"):
        return {}
    raise _NoEquivalent("workers run the ASGI app on Uvicorn event loops")


class _NoEquivalent(Exception):
    def __init__(self, why: str, mapped: Mapped | None = None):
        super().__init__(why)
        self.why, self.mapped = why, mapped or {}


MAPPING: dict[str, Callable[[Any], Mapped]] = {
    "wsgi_app": _same("app"),
    "bind": _bind,
    "backlog": _same("backlog"),
    "workers": _same("workers"),
    "worker_class": _worker_class,
    "worker_connections": _same("limit_concurrency"),
    "timeout": _positive_or_never("worker_timeout", "0: never kill a silent worker"),
    "graceful_timeout": _same("graceful_timeout"),
    "keepalive": _positive_or_never("timeout_keep_alive", "0: no keep-alive"),
    "max_requests": lambda value: {"max_requests": value or None},  # gunicorn's 0: off
    "max_requests_jitter": _same("max_requests_jitter"),
    "forwarded_allow_ips": _same("forwarded_allow_ips"),
    "pidfile": _same("pid_file"),
    "loglevel": lambda value: {"log_level": str(value).lower()},
    "accesslog": _accesslog,
    "errorlog": lambda value: {"log_file": None if value == "-" else value},
    "logconfig": _same("log_config"),
    "logconfig_json": _same("log_config"),
    "reload": _same("reload"),
    "preload_app": _same("preload"),
    "keyfile": _same("ssl_keyfile"),
    "certfile": _same("ssl_certfile"),
    "ca_certs": _same("ssl_ca_certs"),
    "cert_reqs": _same("ssl_cert_reqs"),
    "ciphers": _same("ssl_ciphers"),
    "root_path": _same("root_path"),
    "asgi_loop": _same("loop"),
    "asgi_lifespan": _same("lifespan"),
    "websocket_max_message_size": _same("ws_max_size"),
}
# Why some settings have no equivalent, where the name alone does not say it.
WHY = {
    "threads": "workers are event loops, not threads",
    "daemon": "it runs in the foreground, under systemd or a container runtime",
    "user": "start it as that user",
    "group": "start it as that group",
    "chdir": "start it in that directory (--app-dir only adds a directory to sys.path)",
    "raw_env": "use --env-file",
    "statsd_host": "metrics are served on /metrics (--metrics)",
    "proxy_protocol": "the PROXY protocol is not supported",
    "proxy_allow_ips": "the PROXY protocol is not supported",
    "secure_scheme_headers": "X-Forwarded-Proto is trusted from --forwarded-allow-ips",
    "ssl_version": "gunicorn itself ignores it",
    "config": "",  # the file itself, chosen by --gunicorn-config
}
HOOK_SECTIONS = ("Server Hooks", "Dirty Arbiter Hooks")


@dataclass
class Translation:
    """One gunicorn source as our settings: values, how each was spelled, and the notes."""

    values: dict[str, Any] = field(default_factory=dict)
    spelled: dict[str, str] = field(default_factory=dict)  # our field -> gunicorn's name
    notes: list[str] = field(default_factory=list)

    def spell(self, name: str) -> str:
        """Our setting as the user wrote it there (`timeout`, `--bind`), for errors."""
        return self.spelled.get(name, name)


def translate(
    given: Mapping[str, Any],
    where: str,
    spell: Callable[[str], str] = str,
    defaults: Mapping[str, Any] | None = None,
    sections: Mapping[str, str] | None = None,
) -> Translation:
    """gunicorn's validated values (name -> value) as ours, in the order given.

    `defaults` are gunicorn's own: a setting with no equivalent left at its default asks
    for nothing and is not named. `sections` tell server hooks from other settings.
    """
    out = Translation()
    defaults = defaults or {}
    for name, value in given.items():
        if name == "config":
            continue
        convert = MAPPING.get(name)
        try:
            if convert is None:
                if name in defaults and value == defaults[name]:
                    continue
                raise _NoEquivalent(WHY.get(name, ""))
            mapped = convert(value)
        except _NoEquivalent as missing:
            mapped = missing.mapped
            kind = "a server hook" if (sections or {}).get(name) in HOOK_SECTIONS else ""
            why = "; ".join(filter(None, (kind, missing.why)))
            switch = value is True and spell(name).startswith("-")  # `--preload`
            shown = spell(name) if kind or switch else f"{spell(name)}={value!r}"
            if mapped:  # taken, but not all of it
                out.notes.append(f"{where}: {shown}: {why}")
            else:
                out.notes.append(
                    f"{where}: {shown}{f' ({why})' if why else ''} has no equivalent here: ignored"
                )
        except ValueError as exc:
            raise GunicornConfigError(f"{where}: {spell(name)}={value!r}: {exc}") from None
        for ours, mapped_value in mapped.items():
            out.values[ours] = mapped_value
            out.spelled[ours] = spell(name)
    return out


# --- reading, with gunicorn's own code ------------------------------------------------------


def _gunicorn() -> Any:
    """gunicorn's application and config, imported only when a gunicorn config is used."""
    from gunicorn.app.base import Application
    from gunicorn.config import Config

    class Reader(Application):
        """gunicorn's own reading of a config file and of GUNICORN_CMD_ARGS, without its
        start-up: BaseApplication.__init__ would parse sys.argv and exit on any error."""

        def __init__(self, environ: Mapping[str, str]):
            self.usage, self.prog, self.callable, self.logger = None, CMD_ARGS, None, None
            self.cfg = Config(prog=CMD_ARGS)
            self.cfg.env_orig = dict(environ)  # what get_cmd_args_from_env reads

        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load(self) -> Any:
            raise NotImplementedError

    return Reader


Choice = tuple[str, str]  # (path as given, who chose it: "--gunicorn-config='x' (...)")


@dataclass
class Read:
    """A gunicorn config file and GUNICORN_CMD_ARGS, as two translations (either empty)."""

    file: Translation
    cmd_args: Translation
    path: str | None  # the file read, if any
    chosen_by_cmd_args: bool  # GUNICORN_CMD_ARGS' own --config named it


def read(
    above: Choice | None, below: Choice | None, environ: Mapping[str, str], cwd: Path
) -> Read | None:
    """The gunicorn config file and GUNICORN_CMD_ARGS (if set), read as gunicorn reads
    them: the file first, then the variable's settings over it. The file is the
    --gunicorn-config chosen above GUNICORN_CMD_ARGS (environment, command line), else
    the variable's own --config, else the one chosen below it (config file, profile)."""
    if above is None and below is None and CMD_ARGS not in environ:
        return None
    reader = _gunicorn()(environ)
    cfg = reader.cfg
    defaults = {name: setting.value for name, setting in cfg.settings.items()}
    sections = {name: setting.section for name, setting in cfg.settings.items()}
    flags = {name: setting.cli[-1] for name, setting in cfg.settings.items() if setting.cli}
    args = _parse_cmd_args(cfg)
    own = args.pop("config", None)
    positional = args.pop("args", None) or []
    choice = above or ((own, f"--config={own!r} ({CMD_ARGS})") if own else below)
    file = Translation()
    if choice is not None:
        path, chosen_by = choice
        given = _load_file(reader, path, chosen_by, cwd)
        file = translate(given, path, defaults=defaults, sections=sections)
    env_given = {}
    for name, value in args.items():
        try:
            cfg.set(name, value)
        except Exception as exc:  # gunicorn's validators raise what they like
            raise GunicornConfigError(f"{CMD_ARGS}: {flags[name]} {value}: {exc}") from None
        env_given[name] = cfg.settings[name].get()
    cmd_args = translate(env_given, CMD_ARGS, flags.__getitem__, defaults, sections)
    if "bind" in env_given:  # the variable's bind replaces the file's, address and all
        for name in ADDRESS:
            file.values.pop(name, None)
    if positional:  # gunicorn ignores them in the variable too
        shown = " ".join(positional)
        cmd_args.notes.append(
            f"{CMD_ARGS}: {shown!r} ignored: gunicorn ignores arguments there too (pass APP)"
        )
    path = choice[0] if choice else None
    return Read(file, cmd_args, path, bool(own) and above is None)


def _parse_cmd_args(cfg: Any) -> dict[str, Any]:
    """GUNICORN_CMD_ARGS by gunicorn's own parser: the options given, by setting name."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            namespace = cfg.parser().parse_args(cfg.get_cmd_args_from_env())
    except SystemExit:  # argparse's usage error: keep its one line
        lines = captured.getvalue().strip().splitlines() or ["cannot parse it"]
        message = lines[-1].split("error: ", 1)[-1]
        raise GunicornConfigError(f"{CMD_ARGS}: {message}") from None
    except ValueError as exc:  # shlex: "No closing quotation"
        raise GunicornConfigError(f"{CMD_ARGS}: {exc}") from None
    return {k: v for k, v in vars(namespace).items() if v is not None}


def _load_file(reader: Any, path: str, chosen_by: str, cwd: Path) -> dict[str, Any]:
    """Execute the file with gunicorn's loader and set each of its settings, validated by
    gunicorn (the loop of its load_config_from_file, which prints a bad value and raises
    without naming the setting; this one names it). Its tracebacks become one line; what
    the file prints goes to stderr, never into `config --json`."""
    full = Path(path) if Path(path).is_absolute() else cwd / path
    if not full.is_file():
        raise GunicornConfigError(f"{chosen_by}: gunicorn config {path} does not exist")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            module = reader.get_config_from_filename(str(full))
    except SystemExit as exc:  # gunicorn printed the traceback and exits
        raise GunicornConfigError(f"{chosen_by}: {_why(exc.__context__, str(full))}") from None
    sys.stderr.write(captured.getvalue())
    given = {}
    for name, value in module.items():
        if name not in reader.cfg.settings:  # gunicorn ignores other names, so do we
            continue
        try:
            reader.cfg.set(name, value)
        except Exception as exc:
            raise GunicornConfigError(
                f"{chosen_by}: {name}={value!r}: gunicorn rejects it: {exc}"
            ) from None
        given[name] = reader.cfg.settings[name].get()
    return given


def _why(error: BaseException | None, path: str) -> str:
    """An exception raised by a config file, as one line with the file's line number."""
    if error is None:
        return "the file exited while it was read"
    if isinstance(error, SyntaxError):
        return f"line {error.lineno}: {error.msg} (SyntaxError)"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    at = f"line {lines[-1]}: " if lines else ""
    return f"{at}{type(error).__name__}: {error}"
