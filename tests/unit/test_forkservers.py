"""The master's table of fork servers, and the settings that choose them (no process)."""

from __future__ import annotations

import os
import resource
import socket

import pytest
from pydantic import ValidationError

from asgi_supervise.config.settings import Settings
from asgi_supervise.master.forkserver import Forked, ForkServer, ForkServers, Standby


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


def test_a_standby_is_taken_once_and_only_while_its_process_holds_its_channel() -> None:
    """It writes nothing before its spec: its end closed means it is gone (a socket pair
    stands for the standby's channel; its far end, for the standby)."""
    current = server(10, 0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    current.standby = Standby(ours)
    assert current.take_standby() is None  # its fork server has not said its pid yet
    assert ours.fileno() == -1 and current.standby is None  # closed: it exits
    theirs.close()

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    current.standby = Standby(ours, pid=12)
    taken = current.take_standby()
    assert taken is not None and taken.pid == 12 and current.standby is None
    theirs.close()  # it died
    assert not taken.usable()
    taken.close()


def test_a_standby_on_a_descriptor_above_select_s_range_is_still_looked_at() -> None:
    """A master with many descriptors open gets channels numbered above 1023, which
    select() cannot watch: its checks use poll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 2000
    if hard != resource.RLIM_INFINITY and hard <= high:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: no descriptor {high}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high + 1), hard))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        os.dup2(ours.fileno(), high)
        standby = Standby(socket.socket(fileno=high), pid=12)
        assert standby.usable()
        theirs.close()  # it died
        assert not standby.usable()
        standby.close()
    finally:
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_preload_needs_the_fork_server() -> None:
    assert Settings(preload=True).worker_start == "fork"
    with pytest.raises(ValidationError, match="--preload imports the app in the fork server"):
        Settings(preload=True, worker_start="exec")
