"""Command line: `asgi-supervise [run] APP`, `asgi-supervise config`, `asgi-supervise plan`.

Every setting flag is generated from the settings model, so the CLI cannot drift from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from asgi_supervise import drain, logs, sizing
from asgi_supervise.config import gunicorn_conf, sources
from asgi_supervise.config.settings import FIELDS, meta
from asgi_supervise.launch import COMMANDS, CONTROL
from asgi_supervise.master import signals
from asgi_supervise.master.interpreter import EarlyForkServer
from asgi_supervise.protocol import Exit
from asgi_supervise.sizing import host
from asgi_supervise.suggest import did_you_mean
from asgi_supervise.worker import apploader

log = logging.getLogger("asgi_supervise.master")


# uvicorn flags with no counterpart here, where the closest spelling would mislead.
NOT_OURS = {
    "--timeout-worker-healthcheck": (
        "; uvicorn's ping-reply timeout has no counterpart: --worker-timeout is the seconds "
        "of event-loop silence before a worker is killed"
    ),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag (and a likely fix), exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()[0].split("=")[0]
            known = [o for action in self._actions for o in action.option_strings]
            hint = NOT_OURS.get(unknown) or did_you_mean(unknown, known, spell=str)
        logs.say(f"{message} (command line){hint}")
        sys.exit(Exit.USAGE)


def _is(annotation: Any, kind: type) -> bool:
    """True for `kind` and `kind | None` annotations."""
    if annotation is kind or typing.get_origin(annotation) is kind:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is(arg, kind) for arg in typing.get_args(annotation) if arg is not type(None))
    return False


class BindAction(argparse.Action):
    """gunicorn's `-b/--bind`: HOST:PORT, [IPv6]:PORT, HOST, :PORT or unix:PATH, written into
    the address settings (host, port, uds) as if given as --host/--port/--uds. The model
    holds one listener: a second --bind is refused."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        value = str(values)
        if getattr(namespace, "_bind", None) is not None:
            parser.error(
                f"{option_string} {value}: a second --bind ({namespace._bind} was given): "
                "one master serves one listener; run a second instance for another address"
            )
        namespace._bind = value
        for name, given in parse_bind(value, option_string or "--bind", parser).items():
            setattr(namespace, name, given)


def parse_bind(value: str, flag: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return gunicorn_conf.parse_bind(value)
    except ValueError as exc:
        parser.error(f"{flag} {value or repr(value)}: {exc}")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in FIELDS.items():
        if name == "app":
            continue
        info = meta(name)
        group = groups.setdefault(info["group"], parser.add_argument_group(info["group"]))
        if info.get("bind_aliases"):
            group.add_argument(
                *info["bind_aliases"],
                dest="_bind",
                action=BindAction,
                default=argparse.SUPPRESS,
                metavar="ADDRESS",
                help="gunicorn's bind: HOST:PORT or unix:PATH (sets --host/--port or --uds)",
            )
        flags = ["--" + name.replace("_", "-"), *info.get("aliases", [])]
        flags.sort(key=lambda flag: flag.startswith("--"))  # short ones first: -w, --workers
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": field.description,
        }
        if _is(field.annotation, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is(field.annotation, list):
            kwargs["action"] = "append"
            kwargs["metavar"] = "VALUE"
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(*flags, **kwargs)


OVERVIEW = """\
Run an ASGI app under a master process that supervises Uvicorn workers.

commands:
  [run] APP [OPTIONS]     serve APP (module:attribute); `run` is implied
  config [OPTIONS]        every effective setting and its source
  config --running        the settings the running master uses, and their sources
  plan [OPTIONS]          the worker count the sizing budgets allow, and why
  status [--watch]        the running master's workers, plan and last reload
  reload                  rolling reload of the running master; waits for the outcome
  scale N|+N|-N           set the running master's worker count
  stop [--now]            drain the running master (or stop now) and wait for it to exit

`asgi-supervise COMMAND --help` shows a command's options. The commands that talk to a
running master find it by --socket PATH or --pid-file PATH (see README: control socket).
"""


def build_parser(command: str) -> Parser:
    overview = command == "run"
    parser = Parser(
        prog=f"asgi-supervise {command}" if command != "run" else "asgi-supervise",
        usage=(
            "asgi-supervise [run] APP [OPTIONS]\n       asgi-supervise COMMAND [OPTIONS]"
            if overview
            else None
        ),
        description=OVERVIEW if overview else _DESCRIPTIONS[command],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    if command != "plan":
        parser.add_argument("app", nargs="?", default=argparse.SUPPRESS, help="module:attribute")
    parser.add_argument("--profile", help="dev, container, streaming, prod, or a TOML file")
    parser.add_argument("--config", help="config file (default: asgi-supervise.toml, pyproject)")
    if command != "run":
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--version", action="version", version=_version())
    _add_setting_flags(parser)
    return parser


_DESCRIPTIONS = {
    "config": "Every effective setting and its source (--running: the running master's).",
    "plan": "The worker count the sizing budgets allow, and why.",
}


def _version() -> str:
    from importlib.metadata import version

    return f"asgi-supervise {version('asgi-supervise')}"


def main(argv: list[str] | None = None, early: EarlyForkServer | None = None) -> int:
    """Parse, load the settings, and run the command; `early` is the fork server `launch`
    started before these imports, for the master to take."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CONTROL:
        from asgi_supervise import ctl

        return ctl.main(argv[0], argv[1:])
    if argv[:1] == ["config"] and "--running" in argv:
        from asgi_supervise import ctl

        return ctl.main("config", [a for a in argv[1:] if a != "--running"])
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    args = vars(build_parser(command).parse_args(argv))
    bind = args.pop("_bind", None)
    if bind is not None:
        _check_bind(bind, argv)
    profile, config, as_json = args.pop("profile"), args.pop("config"), args.pop("json", False)
    try:
        loaded = sources.load(args, profile=profile, config_file=config)
        if command != "run":  # `run` logs them, once its logging is set up
            for note in loaded.notes:
                logs.say(note)
        if command == "config":
            return show_config(loaded, as_json)
        if command == "plan":
            return show_plan(loaded, as_json)
        flags = dict(args)
        return run(
            loaded, lambda: sources.load(dict(flags), profile=profile, config_file=config), early
        )
    except sources.ConfigError as exc:
        logs.say(str(exc))
        return Exit.USAGE


def _check_bind(bind: str, argv: list[str]) -> None:
    """--bind sets the address: with --host, --port or --uds too, which one wins is a guess."""
    others = [a.split("=")[0] for a in argv if a.split("=")[0] in ("--host", "--port", "--uds")]
    if others:
        logs.say(f"--bind {bind} and {others[0]} both set the address (command line): give one")
        sys.exit(Exit.USAGE)


def show_config(loaded: sources.Loaded, as_json: bool) -> int:
    document = loaded.document()
    if as_json:
        logs.emit(json.dumps(document, indent=2))
        return 0
    footer = f"# drain: {drain.of(loaded.settings).describe()}"
    logs.emit(config_text(document, f"# profile: {loaded.profile or '(none)'}", footer))
    return 0


def config_text(document: dict[str, Any], heading: str, footer: str = "") -> str:
    """`config`'s table: one line a setting, its value and where it came from."""
    rows = document["settings"]
    width = max(map(len, rows))
    lines = [heading]
    for name, row in rows.items():
        value = json.dumps(row["value"])
        lines.append(f"{name.replace('_', '-'):<{width}} = {value:<24} # {row['source']}")
    return "\n".join([*lines, footer] if footer else lines)


def show_plan(loaded: sources.Loaded, as_json: bool) -> int:
    plan = sizing.make_plan(loaded.settings)
    logs.emit(json.dumps(plan.to_dict(), indent=2) if as_json else plan.render())
    return 0


def run(
    loaded: sources.Loaded,
    reloader: Callable[[], sources.Loaded] | None = None,
    early: EarlyForkServer | None = None,
) -> int:
    from asgi_supervise.master.pidfile import PidFileError, pid_file
    from asgi_supervise.master.sockets import BindError, bind, check_free, cleanup

    settings = loaded.settings
    if not settings.app:
        raise sources.ConfigError(
            "no app to serve: pass APP (module:attribute), set ASGI_SUPERVISE_APP, "
            'or put app = "module:attribute" in asgi-supervise.toml'
        )
    try:
        apploader.check(settings.app, settings.app_dir)
    except apploader.AppStringError as exc:
        raise sources.ConfigError(f"{loaded.describe('app')}: {exc.detail}") from None
    if settings.engine == "gunicorn" and settings.reload:
        raise sources.ConfigError(
            f"{loaded.describe('reload')}: not with --engine gunicorn (gunicorn restarts every "
            "worker at once on a change); use the native engine for development"
        )
    s = settings
    try:
        logs.configure(
            s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config
        )
    except Exception as exc:  # any logging.config failure: the file is what is wrong
        where = f"--log-config {s.log_config}" if s.log_config else f"--log-file {s.log_file}"
        raise sources.ConfigError(f"{where}: cannot set up logging: {exc}") from None
    for note in loaded.notes:
        log.warning("%s", note, extra={"event": "config_ignored"})
    facts = host.read_host()
    plan = sizing.plan(settings, facts)
    if settings.min_ready > plan.workers:  # a fixed count was checked with the settings
        raise sources.ConfigError(
            f"{loaded.describe('min_ready')}: above the {plan.workers} workers --workers auto "
            f"sized (limited by {plan.limited_by}): /readyz could never answer 200"
        )
    try:
        sockets = bind(settings)
    except BindError as exc:
        raise sources.ConfigError(f"{loaded.describe(exc.setting)}: {exc}") from None
    if settings.metrics:  # a busy metrics port fails here, before any worker starts
        try:
            check_free(
                s.metrics_host, s.metrics_port, "serve metrics and health on", prefix="metrics_"
            )
        except BindError as exc:
            cleanup(sockets)
            raise sources.ConfigError(f"{loaded.describe(exc.setting)}: {exc}") from None
    # Said once nothing can fail any more: a usage error stays one line.
    if not plan.forced:
        limit = next((b for b in plan.budgets if b.name == plan.limited_by), None)
        detail = f": {limit.detail}" if limit else ""
        log.info(
            "sizing: %d workers, limited by %s%s", plan.workers, plan.limited_by, detail,
            extra={"event": "plan", "workers": plan.workers, "limited_by": plan.limited_by},
        )  # fmt: skip
    for warning in plan.warnings:
        log.warning("sizing: %s", warning, extra={"event": "sizing_warning"})
    if early is not None and (settings.engine == "gunicorn" or settings.worker_start != "fork"):
        early.discard()
        early = None
    if settings.engine == "gunicorn":
        signals.release()  # gunicorn's arbiter installs its own handlers
        return _run_gunicorn(loaded, sockets, plan, reloader)
    try:
        with pid_file(settings.pid_file):
            return _run_native(loaded, sockets, plan, facts.memory_limit, reloader, early)
    except PidFileError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE


def _run_native(
    loaded: sources.Loaded,
    sockets: list[socket.socket],
    plan: sizing.Plan,
    memory_limit: int | None,
    reloader: Callable[[], sources.Loaded] | None,
    early: EarlyForkServer | None,
) -> int:
    """The native master. The fork server `launch` started gets its spec and the first
    workers' requests before the arbiter's modules are imported: they boot meanwhile."""
    from asgi_supervise.master import forkserver
    from asgi_supervise.master.sockets import cleanup
    from asgi_supervise.observe.observability import metrics_directory

    settings = loaded.settings
    try:
        directory = metrics_directory(settings)
    except OSError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE
    first = None
    if early is not None:
        env = None if directory is None else directory.environ()
        first = forkserver.start_first(settings, sockets, env, early, plan.workers)
        first.await_requested(forkserver.FIRST_WORKERS_WAIT)
    import asyncio

    from asgi_supervise.master.arbiter import Arbiter  # imported while they boot

    arbiter = Arbiter(settings, sockets, plan, memory_limit, directory)
    arbiter.loaded = loaded  # `config --running` shows these settings and their sources
    arbiter.reloader = reloader  # a reload re-reads the config
    arbiter.first = first
    return asyncio.run(arbiter.run())


def _run_gunicorn(
    loaded: sources.Loaded,
    sockets: list[Any],
    plan: sizing.Plan,
    reloader: Callable[[], sources.Loaded] | None,
) -> int:
    """`--engine gunicorn`: gunicorn's arbiter supervises the same workers (README)."""
    from asgi_supervise.gunicorn import app, config
    from asgi_supervise.master.pidfile import PidFileError, pid_file
    from asgi_supervise.master.sockets import cleanup

    given = [name for name in config.NATIVE_ONLY if loaded.origins.get(name) is not None]
    if given:
        what = "; ".join(f"{loaded.describe(n)}: {config.NATIVE_ONLY[n]}" for n in given)
        log.warning("engine gunicorn does not apply %s", what, extra={"event": "engine_warning"})
    try:
        with pid_file(loaded.settings.pid_file):
            return app.serve(loaded, sockets, plan, reloader)
    except PidFileError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE


if __name__ == "__main__":
    sys.exit(main())
