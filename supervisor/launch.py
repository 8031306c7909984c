"""The `asgi-supervise` command: start the first fork server, then the master's imports.

A child of this process reads the settings (`config/reader.py`) from the first line on.
Meanwhile this process imports what the master and every worker both import (`SHARED`:
asyncio, logging, ssl, the channel's protocol), whose pages the master, the fork server
and its workers then share copy-on-write, and forks the first fork server, which imports
uvicorn, the loop and the parser on the other core (`master/interpreter.py` says how it
is handed over). Commands that serve nothing (`config`, `plan`, the control commands,
`--help`, `--version`) start none.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import itertools
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from asgi_supervise.config.reader import Ended, Reading
from asgi_supervise.master import signals
from asgi_supervise.master.interpreter import EarlyForkServer

if TYPE_CHECKING:
    from asgi_supervise.config.reader import RunCommand
    from asgi_supervise.config.values import Loaded

# Imported by the master and by every worker: once, before the first fork server is
# forked. ~35 ms here that the fork server no longer spends; ~6 MB of the master's own
# memory shared instead (docs/benchmarks.md, "Fork server and --preload").
SHARED = (
    "asyncio", "logging.config", "logging.handlers", "ssl", "ctypes", "json", "pickle",
    "tempfile", "inspect", "dataclasses", "traceback", "asgi_supervise.protocol",
    "asgi_supervise.logs", "asgi_supervise.prctl", "asgi_supervise.drain",
    "asgi_supervise.worker.apploader",
)  # fmt: skip
COMMANDS = ("run", "config", "plan")
CONTROL = ("status", "reload", "scale", "stop")  # talk to a running master (ctl.py)
# Workers that do not come from a fork server, as a flag or variable says it (a profile
# or a file may say it too: the settings decide, and an unneeded fork server is stopped).
NO_FORK_SERVER = {"worker-start": "exec", "engine": "gunicorn"}


def serves(argv: list[str]) -> bool:
    """Whether this command line starts a master (`run`, not --help or --version)."""
    if argv[:1] and argv[0] in (*COMMANDS, *CONTROL) and argv[0] != "run":
        return False
    return not any(arg in ("-h", "--help", "--version") for arg in argv)


def forks(argv: list[str], environ: Mapping[str, str]) -> bool:
    """Whether this command line starts a master whose workers come from a fork server."""
    if not serves(argv):
        return False
    for name, value in NO_FORK_SERVER.items():
        flag = f"--{name}"
        variable = "ASGI_SUPERVISE_" + name.upper().replace("-", "_")
        if (
            f"{flag}={value}" in argv
            or (flag, value) in itertools.pairwise(argv)
            or environ.get(variable, "").lower() == value
        ):
            return False
    return True


def open_stdio() -> None:
    """Descriptors 0-2 open, on /dev/null where closed (a daemon started with `<&-` or
    `>&-`): otherwise a channel or a listener would take one of their numbers, and
    uvicorn's loop (libuv) aborts when it closes a descriptor below 3."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    open_stdio()
    if not serves(argv):
        from asgi_supervise.cli import main as cli_main

        return cli_main(argv)
    forking = forks(argv, os.environ)
    if forking:
        signals.hold()  # its first workers may serve before its handlers are in place
    # The settings are read first, in a child: on the start's path, the fork server's
    # imports are not (they take less time than the read, on the other core).
    reading = Reading(functools.partial(_read, argv))
    early = None
    if forking:
        for name in SHARED:
            importlib.import_module(name)
        gc.freeze()  # no collection in any of these processes writes to their pages
        with contextlib.suppress(OSError):  # none (no memory, no descriptors): one later
            early = EarlyForkServer()
    try:
        return serve(reading, early)
    finally:
        if early is not None:
            early.discard()  # unless the master took it


def serve(reading: Reading[tuple[RunCommand, Loaded]], early: EarlyForkServer | None) -> int:
    """`run`: the master starts on the settings its child read (`config/reader.py`) and
    never imports pydantic."""
    from asgi_supervise import logs
    from asgi_supervise.config.values import ConfigError
    from asgi_supervise.master import start
    from asgi_supervise.protocol import Exit

    try:
        line, loaded = reading.result()
        return start.run(loaded, line.reread, early)
    except Ended as end:
        return end.code
    except ConfigError as exc:
        logs.say(str(exc))
        return Exit.USAGE


def _read(argv: list[str]) -> tuple[RunCommand, Loaded]:
    """In the child: the command line parsed, and the settings it gives."""
    from asgi_supervise import cli

    _, line, _ = cli.parse(argv)
    return line, line.load()
