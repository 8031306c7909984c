"""The settings model and what the worker hands uvicorn: each option defined once."""

from __future__ import annotations

import inspect

import uvicorn

from asgi_supervise.config.settings import FIELDS
from asgi_supervise.worker.uvicorn_options import PASSED_AS_IS

# uvicorn.Config parameters that are settings here too, but handled by asgi-supervise:
HANDLED_HERE = {
    "app", "app_dir", "factory",  # apploader imports the app
    "host", "port", "uds", "fd", "workers",  # the master binds and spawns
    "reload", "reload_dirs", "reload_includes", "reload_excludes", "reload_delay",
    "log_config",  # the worker configures logging itself (logs.configure)
    "proxy_headers", "forwarded_allow_ips",  # worker/forwarded.py wraps the app
    "headers",  # "Name: value" strings, split by uvicorn_config
}  # fmt: skip


def test_every_passed_option_is_a_setting_and_a_uvicorn_parameter():
    parameters = inspect.signature(uvicorn.Config).parameters
    assert len(set(PASSED_AS_IS)) == len(PASSED_AS_IS)
    assert not set(PASSED_AS_IS) - set(FIELDS), "named but not a setting"
    assert not set(PASSED_AS_IS) - set(parameters), "not a uvicorn.Config parameter"


def test_no_setting_uvicorn_knows_is_left_behind():
    """A new field named like a uvicorn parameter must be passed or handled, not dropped."""
    parameters = set(inspect.signature(uvicorn.Config).parameters)
    shared = set(FIELDS) & parameters
    assert shared - set(PASSED_AS_IS) - HANDLED_HERE == set()
