"""The built-in profiles load, validate and hold the values their comments promise.

`config` output runs the CLI's `main` in-process (conftest.run_main); the binary reads a
built-in profile in tests/e2e/test_config_layers.py.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from asgi_supervise import drain, profiles
from asgi_supervise.config import sources
from asgi_supervise.config.settings import FIELDS, Settings
from conftest import run_main as run_cli

pytestmark = pytest.mark.timeout(60)

BUILT_IN = ["container", "dev", "prod", "streaming"]
K8S_GRACE_PERIOD = 30  # Kubernetes' default terminationGracePeriodSeconds

# What each profile's comments document, field by field.
DOCUMENTED: dict[str, dict[str, Any]] = {
    "dev": {
        "workers": 1,
        "reload": True,
        "host": "127.0.0.1",
        "log_level": "debug",
        "log_format": "text",
        "graceful_timeout": 3,
        "worker_timeout": 3600,
        "metrics": False,
    },
    "container": {
        "workers": "auto",
        "cpu_workers_per_core": 1.0,
        "host": "0.0.0.0",
        "log_format": "json",
        "proxy_headers": True,
        "forwarded_allow_ips": ["127.0.0.1"],
        "drain_delay": 5,
        "graceful_timeout": 10,
        "metrics": True,
        "metrics_host": "0.0.0.0",
        "metrics_port": 9808,
    },
    "streaming": {
        "workers": "auto",
        "host": "0.0.0.0",
        "log_format": "json",
        "proxy_headers": True,
        "drain_delay": 5,
        "stream_drain_grace": 0.5,
        "graceful_timeout": 10,
        "shutdown_timeout": 5,
        "timeout_keep_alive": 5,
        "ws_ping_interval": 20,
        "ws_ping_timeout": 20,
        "limit_concurrency": 1000,
        "max_worker_lifetime": 21600,
        "max_worker_lifetime_jitter": 1800,
        "max_worker_memory": 1024,
        "metrics": True,
        "metrics_host": "0.0.0.0",
    },
    "prod": {
        "workers": "auto",
        "cpu_workers_per_core": 1.0,
        "host": "127.0.0.1",
        "log_format": "json",
        "max_requests": 10000,
        "max_requests_jitter": 1000,
        "graceful_timeout": 30,
        "metrics": True,
        "metrics_host": "127.0.0.1",
    },
}


def profile_table(name: str) -> dict[str, Any]:
    with profiles.find_profile(name).open("rb") as fh:
        return {key.replace("-", "_"): value for key, value in tomllib.load(fh).items()}


def load(name: str, tmp_path: Path) -> sources.Loaded:
    """The profile alone: no config file (empty cwd) and no environment."""
    return sources.load({}, profile=name, environ={}, cwd=tmp_path)


def test_the_built_in_profiles_are_these_four():
    assert profiles.names() == BUILT_IN
    assert set(DOCUMENTED) == set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_profile_loads_and_holds_its_documented_values(tmp_path: Path, name: str):
    loaded = load(name, tmp_path)
    assert loaded.profile == name
    settings = loaded.settings
    for field, value in DOCUMENTED[name].items():
        assert getattr(settings, field) == value, field
        assert loaded.origin(field) == f"profile {name}", field


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_profile_key_is_a_setting_and_nothing_else_changes(tmp_path: Path, name: str):
    table = profile_table(name)
    assert set(table) <= set(FIELDS)
    assert set(table) == set(DOCUMENTED[name]), "a profile value without a test, or vice versa"
    loaded = load(name, tmp_path)
    defaults = Settings.model_validate({})
    for field in FIELDS:
        if field in table:
            assert loaded.origin(field) == f"profile {name}"
        else:
            assert loaded.origin(field) == "default", field
            assert getattr(loaded.settings, field) == getattr(defaults, field), field


@pytest.mark.parametrize("name", [None, "container", "streaming"])
def test_drain_fits_the_kubernetes_grace_period(tmp_path: Path, name: str | None):
    """SIGTERM to exit at worst (a worker's loop blocked: aborted, then killed) leaves
    margin inside Kubernetes' default 30 s, with no profile and with the pod profiles."""
    settings = load(name, tmp_path).settings if name else Settings.model_validate({})
    assert drain.of(settings).worst_case <= K8S_GRACE_PERIOD - 5


def test_streaming_ends_streams_well_inside_its_graceful_timeout(tmp_path: Path):
    settings = load("streaming", tmp_path).settings
    assert settings.stream_drain_grace < settings.graceful_timeout
    assert "http.disconnect" in profiles.find_profile("streaming").read_text()


@pytest.mark.parametrize("name", BUILT_IN)
def test_profiles_that_listen_everywhere_also_trust_only_local_proxies(tmp_path, name):
    """A profile reachable from the network must not trust X-Forwarded-* from everyone."""
    settings = load(name, tmp_path).settings
    assert "*" not in settings.forwarded_allow_ips
    if settings.metrics:
        assert settings.metrics_port != settings.port


@pytest.mark.parametrize("name", BUILT_IN)
def test_profile_through_the_cli(tmp_path: Path, name: str):
    result = run_cli("config", "--json", "--profile", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["profile"] == name
    for field, value in DOCUMENTED[name].items():
        entry = data["settings"][field]
        assert entry == {"value": value, "source": f"profile {name}"}, field


def test_container_profile_text_output(tmp_path: Path):
    result = run_cli("config", "--profile", "container", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    for key, shown in [
        ("host", '"0.0.0.0"'),
        ("log-format", '"json"'),
        ("drain-delay", "5.0"),
        ("graceful-timeout", "10.0"),
        ("metrics", "true"),
        ("workers", '"auto"'),
    ]:
        value, _, source = rows[key].partition("#")
        assert value.split("=", 1)[1].strip() == shown, key
        assert source.strip() == "profile container", key


@pytest.mark.parametrize("name", BUILT_IN)
def test_profile_chosen_by_environment_variable(tmp_path: Path, name: str):
    result = run_cli("config", "--json", cwd=tmp_path, env={"ASGI_SUPERVISE_PROFILE": name})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["profile"] == name
