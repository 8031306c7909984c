"""`logs.configure`: what this process already has is not set up again (a worker forked
from a fork server that set it up keeps its handlers); other settings, or a --log-config
file, are."""

from __future__ import annotations

import json
import logging

import pytest

from asgi_supervise import logs

NAMES = ("asgi_supervise", "uvicorn", "uvicorn.access", "uvicorn.error")


@pytest.fixture(autouse=True)
def restore_logging():
    saved = {}
    for name in NAMES:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate)
    applied = logs._applied
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    logs._applied = applied


def handler() -> logging.Handler:
    return logging.getLogger("asgi_supervise").handlers[0]


def test_the_same_settings_keep_the_handlers():
    logs.configure("text", "info", True)
    first = handler()
    logs.configure("text", "info", True)
    assert handler() is first


def test_other_settings_set_logging_up_again():
    logs.configure("text", "info", True)
    first = handler()
    logs.configure("json", "debug", False)
    assert handler() is not first
    assert isinstance(handler().formatter, logs.JSONFormatter)
    assert logging.getLogger("asgi_supervise").level == logging.DEBUG
    assert logging.getLogger("uvicorn.access").level == logging.WARNING


def test_a_log_config_file_is_read_every_time(tmp_path):
    path = tmp_path / "logging.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"h": {"class": "logging.StreamHandler"}},
                "loggers": {"asgi_supervise": {"handlers": ["h"], "level": "INFO"}},
            }
        )
    )
    logs.configure("text", "info", True, log_config=str(path))
    first = handler()
    logs.configure("text", "info", True, log_config=str(path))
    assert handler() is not first
    logs.configure("text", "info", True)  # back to the built-in: set up, not skipped
    assert handler() is not first and handler().formatter._fmt == logs.TEXT_FORMAT


def test_the_same_settings_reopen_a_log_file_moved_since(tmp_path):
    """A worker forked from a fork server set up before a logrotate (which moved the file
    and had the master, not the fork server, reopen it) writes to the file at the path."""
    path = tmp_path / "app.log"
    logs.configure("text", "info", True, log_file=str(path))
    path.rename(tmp_path / "app.log.1")  # logrotate
    logs.configure("text", "info", True, log_file=str(path))  # the forked worker's boot
    logging.getLogger("asgi_supervise").warning("after the rotation")
    handler().flush()
    assert "after the rotation" in path.read_text()
    assert "after the rotation" not in (tmp_path / "app.log.1").read_text()
    handler().close()
