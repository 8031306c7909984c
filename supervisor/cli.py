"""Command line: `asgi-supervise [run] APP`, `asgi-supervise config`, `asgi-supervise plan`.

Every setting flag is generated from the settings model, so the CLI cannot drift from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from typing import Any, NoReturn

from asgi_supervise import drain, logs
from asgi_supervise.config import gunicorn_conf
from asgi_supervise.config.reader import RunCommand
from asgi_supervise.config.settings import FIELDS, meta
from asgi_supervise.config.values import ConfigError, Loaded
from asgi_supervise.launch import COMMANDS, CONTROL
from asgi_supervise.master.interpreter import EarlyForkServer
from asgi_supervise.protocol import Exit
from asgi_supervise.suggest import did_you_mean

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
    command, line, as_json = parse(argv)
    try:
        loaded = line.load()
        if command != "run":  # `run` logs them, once its logging is set up
            for note in loaded.notes:
                logs.say(note)
        if command == "config":
            return show_config(loaded, as_json)
        if command == "plan":
            return show_plan(loaded, as_json)
        from asgi_supervise.master import start

        return start.run(loaded, line.load, early)
    except ConfigError as exc:
        logs.say(str(exc))
        return Exit.USAGE


def parse(argv: list[str]) -> tuple[str, RunCommand, bool]:
    """The command, the command line's settings (flags, profile, config file), and --json.
    A usage error exits 2, said in one line."""
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    args = vars(build_parser(command).parse_args(argv))
    bind = args.pop("_bind", None)
    if bind is not None:
        _check_bind(bind, argv)
    profile, config, as_json = args.pop("profile"), args.pop("config"), args.pop("json", False)
    return command, RunCommand(args, profile, config), as_json


def _check_bind(bind: str, argv: list[str]) -> None:
    """--bind sets the address: with --host, --port or --uds too, which one wins is a guess."""
    others = [a.split("=")[0] for a in argv if a.split("=")[0] in ("--host", "--port", "--uds")]
    if others:
        logs.say(f"--bind {bind} and {others[0]} both set the address (command line): give one")
        sys.exit(Exit.USAGE)


def show_config(loaded: Loaded, as_json: bool) -> int:
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


def show_plan(loaded: Loaded, as_json: bool) -> int:
    from asgi_supervise import sizing

    plan = sizing.make_plan(loaded.settings)
    logs.emit(json.dumps(plan.to_dict(), indent=2) if as_json else plan.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
