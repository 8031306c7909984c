"""Socket activation's environment, read without touching any descriptor."""

from __future__ import annotations

import os

import pytest

from asgi_supervise.master.sockets import from_systemd


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "1", "LISTEN_PID": "1"},  # another process's sockets (its parent's)
        {"LISTEN_FDS": "1"},  # no LISTEN_PID: not for us
        {"LISTEN_FDS": "x", "LISTEN_PID": "self"},
        {"LISTEN_FDS": "0", "LISTEN_PID": "self"},
    ],
)
def test_no_sockets_unless_systemd_passed_them_to_this_process(environ):
    environ = {k: str(os.getpid()) if v == "self" else v for k, v in environ.items()}
    environ["LISTEN_FDNAMES"] = "http"
    environ["OTHER"] = "kept"
    assert from_systemd(environ) == []
    assert environ == {"OTHER": "kept"}  # never passed on to workers
