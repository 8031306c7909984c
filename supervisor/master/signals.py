"""The signals the master acts on, and those that arrive before its event loop runs.

The first workers can be serving before the master's loop starts (`forkserver.start_first`
asks for them while the master still imports): a SIGTERM or SIGHUP then must reach the
arbiter like any other, not end the master with the default action and its workers with
it. `hold` records them from the first line of `launch` on; the arbiter takes them
(`held`) once its own handlers are installed, and acts on them in order. A second
SIGTERM, SIGINT or SIGQUIT before that takes the default action: a start that hangs can
still be stopped (its fork server and workers die with it).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

HANDLED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD,
)  # fmt: skip
_HELD = tuple(sig for sig in HANDLED if sig != signal.SIGCHLD)  # the loop reaps anyway
_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)  # a second one ends a held start
_arrived: list[int] = []
_holding = False


def _record(sig: int, frame: FrameType | None) -> None:
    if sig in _STOP and sig in _arrived:  # a second one: the start may hang, stop it now
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    _arrived.append(sig)


def hold() -> None:
    """Record these signals until the arbiter takes them."""
    global _holding
    _holding = True
    for sig in _HELD:
        signal.signal(sig, _record)


def held() -> list[int]:
    """The signals recorded so far, oldest first; recording goes on until handlers change."""
    taken = _arrived[:]
    _arrived.clear()
    return taken


def reset() -> None:
    """Default actions, nothing recorded: for a process forked while they were held (the
    first fork server), which must not act on the master's signals."""
    _default_actions()
    _arrived.clear()


def release() -> None:
    """Back to the default actions, and what arrived meanwhile delivered again: for a
    master that installs handlers of its own later (the gunicorn engine)."""
    if not _holding:
        return
    _default_actions()
    for sig in held():
        os.kill(os.getpid(), sig)


def _default_actions() -> None:
    global _holding
    _holding = False
    for sig in _HELD:
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
