"""--pid-file: the master's pid for `kill -HUP $(cat app.pid)`, gone when the master is."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger("asgi_supervise.master")

# psutil's create_time comes from the boot time, which /proc gives in whole seconds.
CLOCK_SLACK = 2.0


class PidFileError(Exception):
    """Another live master owns the file: printed as one line, exit code 2."""


def is_master_command(cmdline: list[str]) -> bool:
    """`python -m asgi_supervise ...` or the `asgi-supervise` script (run by an interpreter
    or directly); not a worker (`-m asgi_supervise.worker`)."""
    for index, arg in enumerate(cmdline):
        if arg == "-m" and index + 1 < len(cmdline):
            return cmdline[index + 1] in ("asgi_supervise", "asgi_supervise.cli")
        if index < 2 and os.path.basename(arg) == "asgi-supervise":
            return True
    return False


def stale_owner(pid: int, written_at: float) -> str | None:
    """Why live process `pid` did not write a pid file last written at `written_at`, or
    None if it may have (an asgi-supervise master that started before that).

    The kernel reuses pids: after a master was killed, its pid may name anything."""
    import psutil

    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        cmdline = proc.cmdline()
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.AccessDenied:
        return None  # cannot tell: assume it is a master of another user
    if created > written_at + CLOCK_SLACK:
        return "a process started after the file was written"
    if not is_master_command(cmdline):
        shown = " ".join(cmdline)[:80] or proc.name()
        return f"not an asgi-supervise master ({shown})"
    return None


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import psutil  # here, not at the top: a start without a pid file does not wait for it

    try:
        with open(path) as fh:
            other = int(fh.read().strip() or 0)
        written_at = os.stat(path).st_mtime
    except (FileNotFoundError, ValueError):
        other, written_at = 0, 0.0
    if other and other != os.getpid() and psutil.pid_exists(other):
        why = stale_owner(other, written_at)
        if why is None:
            raise PidFileError(f"--pid-file {path}: process {other} is running and owns it")
        log.warning(
            "--pid-file %s: stale, its pid %d is now %s: taking it over",
            path, other, why, extra={"event": "pid_file_taken_over", "stale_pid": other},
        )  # fmt: skip
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
