"""prctl(2), the Linux process controls master and workers use, through one libc handle
per process. A fork server makes it before it forks (naming itself), so its workers
inherit it instead of each building one: fewer shared pages copied per worker."""

from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1  # a signal from the kernel when our parent dies
PR_SET_NAME = 15  # our name (comm) in ps and top
PR_SET_CHILD_SUBREAPER = 36  # our descendants' orphans become our children

_libc: ctypes.CDLL | None = None


def prctl(option: int, value: int | bytes) -> bool:
    """True if it took effect; False off Linux, or if the kernel refused it."""
    global _libc
    if sys.platform != "linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    arg = ctypes.c_char_p(value) if isinstance(value, bytes) else value
    return _libc.prctl(option, arg, 0, 0, 0) == 0
