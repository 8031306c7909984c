"""--pid-file: whose pid a file holds, and when it is stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from asgi_supervise.master import pidfile


@pytest.mark.parametrize(
    ("cmdline", "master"),
    [
        (["/venv/bin/python", "-m", "asgi_supervise", "app:app"], True),
        (["/venv/bin/python", "-X", "dev", "-m", "asgi_supervise.cli", "app:app"], True),
        (["/venv/bin/python", "/venv/bin/asgi-supervise", "app:app"], True),
        (["/usr/local/bin/asgi-supervise", "--workers", "2"], True),
        (["/venv/bin/python", "-m", "asgi_supervise.worker", "--slot", "1"], False),
        (["/venv/bin/python", "-m", "pytest", "tests/asgi-supervise"], False),
        (["sleep", "30"], False),
        ([], False),
    ],
)
def test_is_master_command(cmdline, master):
    assert pidfile.is_master_command(cmdline) is master


def test_a_live_process_that_is_no_master_does_not_own_the_file():
    reason = pidfile.stale_owner(os.getpid(), written_at=time.time())
    assert reason is not None and reason.startswith("not an asgi-supervise master")


def test_a_process_younger_than_the_file_did_not_write_it():
    reason = pidfile.stale_owner(os.getpid(), written_at=0.0)  # written in 1970
    assert reason == "a process started after the file was written"


def test_stale_file_naming_this_process_is_taken_over(tmp_path: Path):
    path = tmp_path / "app.pid"
    path.write_text(f"{os.getppid()}\n")  # the test runner's parent: alive, no master
    with pidfile.pid_file(str(path)):
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()
