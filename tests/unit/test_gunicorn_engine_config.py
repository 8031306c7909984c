"""The settings model as gunicorn's configuration: what gunicorn's own Config ends up with.

No process: `Application` runs gunicorn's config loading (``cfg.set`` and its validators)
in the test's process, and the cfg is read back the way gunicorn's arbiter reads it.
"""

from __future__ import annotations

import pytest

from asgi_supervise import drain
from asgi_supervise.config.settings import FIELDS, Settings
from asgi_supervise.gunicorn.app import Application, Logger
from asgi_supervise.gunicorn.config import NATIVE_ONLY, bind_address, cfg_values, graceful_timeout
from asgi_supervise.gunicorn.observer import WorkerView, exit_reason
from asgi_supervise.gunicorn.worker import RecycleLimits, UvicornWorker, resident_bytes


def test_settings_become_gunicorns_cfg():
    settings = Settings(
        app="main:app", host="0.0.0.0", port=8080, engine="gunicorn", worker_timeout=12.5,
        graceful_timeout=20, shutdown_timeout=4, timeout_keep_alive=7, max_requests=1000,
        max_requests_jitter=50, forwarded_allow_ips=["10.0.0.1", "10.0.0.2"], backlog=512,
        log_level="warning",
    )  # fmt: skip
    cfg = Application(settings, workers=3).cfg
    assert cfg.bind == ["0.0.0.0:8080"]
    assert cfg.address == [("0.0.0.0", 8080)]
    assert cfg.workers == 3  # the plan's count, not the setting's
    assert cfg.worker_class is UvicornWorker
    assert cfg.timeout == 13  # whole seconds, rounded up: never shorter than asked
    # The worker's own bound (graceful + cancel + lifespan shutdown) plus the margin:
    # gunicorn never kills a worker in the middle of the app's shutdown (uvicorn #2094).
    assert cfg.graceful_timeout == 20 + 1 + 4 + 2
    assert cfg.keepalive == 7
    assert (cfg.max_requests, cfg.max_requests_jitter) == (1000, 50)
    assert cfg.forwarded_allow_ips == ["10.0.0.1", "10.0.0.2"]
    assert cfg.backlog == 512
    assert cfg.loglevel == "warning"
    assert cfg.logger_class is Logger
    assert cfg.preload_app is False
    assert cfg.control_socket_disable is True
    assert callable(cfg.post_fork) and callable(cfg.child_exit)


def test_defaults_map_to_what_the_native_engine_does():
    settings = Settings(app="main:app")
    values = cfg_values(settings, workers=1)
    assert values["max_requests"] == 0  # gunicorn's "never"
    assert values["max_requests_jitter"] == 0
    assert values["timeout"] == 30
    assert values["graceful_timeout"] == graceful_timeout(settings)
    assert graceful_timeout(settings) >= drain.of(settings).worker_bound
    assert values["loglevel"] == "info"
    assert cfg_values(Settings(app="m:a", log_level="trace"), 1)["loglevel"] == "debug"


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ({"host": "127.0.0.1", "port": 8000}, "127.0.0.1:8000"),
        ({"host": "::1", "port": 9000}, "[::1]:9000"),
        ({"uds": "/run/app.sock"}, "unix:/run/app.sock"),
        ({"fd": 3}, "fd://3"),
    ],
)
def test_bind_address_in_gunicorns_spelling(given, address):
    assert bind_address(Settings(app="m:a", **given)) == address


def test_native_only_settings_exist():
    assert set(NATIVE_ONLY) <= set(FIELDS)


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        ({"stop_reason": "reload", "ready_at": 1.0}, "reload"),
        ({"stop_reason": "timeout", "ready_at": None}, "timeout"),
        ({"ready_at": None}, "boot-failure"),
        ({"ready_at": 1.0}, "crash"),
    ],
)
def test_exit_reason(view, reason):
    assert exit_reason(WorkerView(pid=1, age=1, sock=None, **view)) == reason  # type: ignore[arg-type]


def test_recycle_limits_from_the_settings():
    settings = Settings(
        app="m:a", max_worker_memory=300, max_worker_lifetime=600, max_worker_lifetime_jitter=60
    )
    limits = RecycleLimits.of(settings)
    assert limits.memory == 300 * 1024 * 1024
    assert limits.lifetime is not None and 600 <= limits.lifetime <= 660
    assert RecycleLimits.of(Settings(app="m:a")) == (None, None)
    rss = resident_bytes()
    assert rss is not None and 1024 * 1024 < rss < 4096 * 1024 * 1024  # this test process
