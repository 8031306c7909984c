"""The master's table of fork servers, and the settings that choose them (no process)."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from asgi_supervise.config.settings import Settings
from asgi_supervise.master.forkserver import Forked, ForkServer, ForkServers


def server(pid: int, generation: int) -> ForkServer:
    channel, _ = socket.socketpair()
    return ForkServer(Forked(pid), channel, generation, preload=False)  # type: ignore[arg-type]


def test_a_new_fork_server_replaces_the_current_one_only_once_it_is_up() -> None:
    forks = ForkServers()
    first = server(10, 0)
    forks.add(first)
    assert (forks.current, forks.next, forks.newest()) == (None, first, first)
    assert forks.promote(first) is None  # nothing to retire at start
    second = server(11, 1)
    forks.add(second)  # a reload: the old one still forks while the new one boots
    assert (forks.current, forks.newest()) == (first, second)
    assert forks.promote(second) is first  # the caller retires it
    assert (forks.current, forks.next, forks.starts) == (second, None, 2)
    forks.forget(first)  # reaped
    assert forks.alive() == [second] and forks.get(10) is None
    forks.forget(second)  # died: nothing current until a new one is up
    assert (forks.current, forks.newest(), forks.alive()) == (None, None, [])


def test_preload_needs_the_fork_server() -> None:
    assert Settings(preload=True).worker_start == "fork"
    with pytest.raises(ValidationError, match="--preload imports the app in the fork server"):
        Settings(preload=True, worker_start="exec")
