"""--pid-file: the master's pid for `kill -HUP $(cat app.pid)`, gone when the master is."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psutil


class PidFileError(Exception):
    """Another live master owns the file: printed as one line, exit code 2."""


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    try:
        with open(path) as fh:
            other = int(fh.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        other = 0
    if other and other != os.getpid() and psutil.pid_exists(other):
        raise PidFileError(f"--pid-file {path}: process {other} is running and owns it")
    try:
        with open(path, "w") as fh:  # a stale file from a killed master is overwritten
            fh.write(f"{os.getpid()}\n")
    except OSError as exc:
        raise PidFileError(f"--pid-file {path}: cannot write it: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
