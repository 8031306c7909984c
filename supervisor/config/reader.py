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
from typing import Any, Generic, NoReturn, TypeVar

from asgi_supervise.config.values import ConfigError, Loaded

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


class Reading(Generic[T]):
    """A child running `read()`, forked at once; `result()` waits for what it sends: its
    result, its ConfigError raised here, or `Ended` if it exited (it printed why).

    A process with other threads reads in itself: a fork would copy the locks they hold
    (the import lock among them) held, forever. So does one that cannot fork (no memory,
    no process or descriptor left): the read matters more than where it runs.
    """

    def __init__(self, read: Callable[[], T]) -> None:
        self.read, self.pid, self.fd = read, 0, -1
        if _threads() > 1:  # gunicorn's master (its observer), --reload's watch
            return
        for stream in (sys.stdout, sys.stderr):  # a buffer copied into the child prints twice
            if stream is not None:  # None: started without that descriptor
                stream.flush()
        try:
            self.fd, theirs = os.pipe()
        except OSError:
            return
        try:
            self.pid = os.fork()
        except OSError:
            os.close(self.fd)
            os.close(theirs)
            self.fd = -1
            return
        if self.pid == 0:
            try:
                from asgi_supervise.prctl import PR_SET_NAME, prctl

                prctl(PR_SET_NAME, NAME)  # first: in ps it is no worker
                os.close(self.fd)
                _child(read, theirs)
            finally:
                os._exit(1)  # never back into the caller's code
        os.close(theirs)

    def result(self) -> T:
        if not self.pid:
            return self.read()
        with open(self.fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(self.pid, 0)
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


def _threads() -> int:
    """This process's threads as the kernel counts them: C extensions' too, which
    `threading` does not know of."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def in_child(read: Callable[[], T]) -> T:
    """`read()`, run in a forked child (see `Reading`). The caller's loop waits: ~0.1 s."""
    return Reading(read).result()


def _child(read: Callable[[], Any], fd: int) -> NoReturn:
    try:
        # The asker's handlers are not ours: a ^C or a SIGTERM to the group is its to act on
        # (it waits for this child), and its loop's wake-up descriptor must not hear them.
        signal.set_wakeup_fd(-1)
        for sig in signal.valid_signals():
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_IGN)
        # Our own model: no plugin of the app's environment sees it, and no scan of every
        # installed distribution for one (~15 ms of each read).
        os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
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
