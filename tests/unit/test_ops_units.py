"""The systemd units' numbers follow the settings they depend on (no process started)."""

from __future__ import annotations

from pathlib import Path

from asgi_supervise import drain
from asgi_supervise.config import sources
from asgi_supervise.config.settings import FIELDS

DEPLOY = Path(__file__).parent.parent.parent / "deploy"


def unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def profile(name: str):
    return sources.load({}, profile=name, environ={}).settings


def test_stop_timeout_covers_the_drain_of_the_profile_it_runs():
    service = unit("asgi-supervise.service")
    assert service["ExecStart"][0].endswith("--profile prod")
    needed = drain.of(profile("prod")).worst_case  # what `plan` prints: the product's sum
    assert seconds(service["TimeoutStopSec"][0]) >= needed
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the master alone: it drains


def test_start_timeout_covers_a_workers_ready_timeout():
    service = unit("asgi-supervise.service")
    assert seconds(service["TimeoutStartSec"][0]) > profile("prod").ready_timeout


def test_file_limit_covers_the_streaming_profiles_concurrency():
    limit = int(unit("asgi-supervise.service")["LimitNOFILE"][0])
    assert limit >= (profile("streaming").limit_concurrency or 0) + 64


def test_works_on_systemd_252():
    service = unit("asgi-supervise.service")
    assert service["Type"] == ["notify"]  # notify-reload is 253+: a drop-in
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit("systemd/notify-reload.conf")["Type"] == ["notify-reload"]


def test_socket_backlog_matches_the_masters():
    assert unit("asgi-supervise.socket")["Backlog"] == [str(FIELDS["backlog"].default)]


def test_writable_paths_are_the_runtime_directory():
    service = unit("asgi-supervise.service")
    assert service["ProtectSystem"] == ["strict"]
    runtime = "%t/" + service["RuntimeDirectory"][0] + "/"
    env = dict(item.split("=", 1) for item in service["Environment"])
    assert env["ASGI_SUPERVISE_PID_FILE"].startswith(runtime)
    assert env["ASGI_SUPERVISE_MULTIPROC_DIR"].startswith(runtime)
