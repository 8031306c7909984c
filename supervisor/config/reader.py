"""Read the settings in a forked child, so the process that asks never imports pydantic.

A master asks at its start (`launch`) and on every reload: the child imports the settings
model, reads and checks every layer, sends back what passed as plain data
(`values.Loaded`) or the one-line error, and exits. A read costs the child's imports,
~0.1 s; the master saves the model's ~14 MB for as long as it runs (docs/benchmarks.md).
Standard library only on the asking side.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from asgi_supervise.config.values import ConfigError, Loaded
from asgi_supervise.prctl import PR_SET_NAME, prctl

T = TypeVar("T")
NAME = b"asgi-config"  # its name in ps and top (comm): it shares the master's command line


class Ended(Exception):
    """The child ended the command itself, having said why (a usage error): exit `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class RunCommand:
    """`run`'s command line, parsed: what a reload reads the settings from again."""

    flags: dict[str, Any]
    profile: str | None
    config_file: str | None

    def load(self) -> Loaded:
        """The settings as the layers say now, read in this process."""
        from asgi_supervise.config import sources

        return sources.load(dict(self.flags), profile=self.profile, config_file=self.config_file)

    def reread(self) -> Loaded:
        """The settings as the layers say now, read in a child."""
        return in_child(self.load)


def in_child(read: Callable[[], T], meanwhile: Callable[[], object] | None = None) -> T:
    """`read()`, run in a forked child: its result, or its ConfigError raised here; `Ended`
    if it exited (it printed why). `meanwhile` runs here as the child reads. The caller's
    loop waits: ~0.1 s. A process with other threads reads in itself: a fork would copy
    the locks they hold (the import lock among them) held, forever."""
    if threading.active_count() > 1:  # gunicorn's master (its observer), `--reload`'s watch
        if meanwhile is not None:
            meanwhile()
        return read()
    for stream in (sys.stdout, sys.stderr):  # a buffer copied into the child prints twice
        if stream is not None:  # None: started without that descriptor
            stream.flush()
    ours, theirs = os.pipe()
    pid = os.fork()
    if pid == 0:
        prctl(PR_SET_NAME, NAME)  # first: in ps it is not a worker, even for a moment
        os.close(ours)
        _child(read, theirs)
    os.close(theirs)
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        with open(ours, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    if not data:
        why = os.waitstatus_to_exitcode(status)
        ending = f"signal {-why}" if why < 0 else f"exit code {why}"
        raise ConfigError(f"the settings could not be read: their reader ended by {ending}")
    kind, payload = pickle.loads(data)
    if kind == "exit":
        raise Ended(payload)
    if kind == "error":
        raise ConfigError(payload)
    if kind == "crash":
        raise RuntimeError(f"reading the settings failed:\n{payload}")
    return payload


def _child(read: Callable[[], Any], fd: int) -> NoReturn:
    try:
        # The asker's handlers are not ours: a ^C or a SIGTERM to the group is its to act on
        # (it waits for this child), and its loop's wake-up descriptor must not hear them.
        signal.set_wakeup_fd(-1)
        for sig in signal.valid_signals():
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_IGN)
        try:
            result: tuple[str, Any] = ("ok", read())
        except ConfigError as exc:
            result = ("error", str(exc))
        except SystemExit as exc:  # argparse: it printed the usage error
            code = exc.code
            if not isinstance(code, int):
                print(code, file=sys.stderr)
            result = ("exit", code if isinstance(code, int) else 1)
        except BaseException:
            result = ("crash", traceback.format_exc())
        with open(fd, "wb") as pipe:
            pipe.write(pickle.dumps(result))
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)
