"""Where the control socket goes, and what scaling past the plan says (no processes)."""

from __future__ import annotations

from asgi_supervise.config.settings import Settings
from asgi_supervise.master import control
from asgi_supervise.sizing import over_budgets
from asgi_supervise.sizing.facts import GIB, HostFacts


def test_socket_path_explicit_then_beside_the_pid_file_then_runtime_dir(monkeypatch, tmp_path):
    assert control.socket_path("/run/x/ctl.sock", "/run/x/app.pid", 42) == "/run/x/ctl.sock"
    assert control.socket_path(None, "/run/x/app.pid", 42) == "/run/x/app.sock"
    assert control.socket_path(None, "/run/x/master", 42) == "/run/x/master.sock"
    assert control.socket_path(None, "/run/x/odd.sock", 42) == "/run/x/odd.sock.ctl"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert control.socket_path(None, None, 42) == f"{tmp_path}/asgi-supervise/master-42.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    uid = __import__("os").getuid()
    assert control.socket_path(None, None, 42) == f"{tmp_path}/asgi-supervise-{uid}/master-42.sock"


def _facts() -> HostFacts:
    return HostFacts(
        cpu_quota=None, cpu_quota_source="none", cpuset_cpus=None, cpuset_source="none",
        affinity_cpus=None, host_cpus=4, memory_limit=None, memory_limit_source="none",
        host_memory=16 * GIB,
    )  # fmt: skip


def test_over_budgets_names_each_budget_with_its_numbers():
    settings = Settings(workers=6, db_max_connections=50, db_pool_size=10)
    warnings = over_budgets(settings, _facts(), 6)
    assert warnings == [
        "the cpu budget allows 4: 6 workers > 4 usable CPUs (host CPU count)",
        "the db budget allows 5: 6 workers x 10 connections x 1 replica = 60 > 50 available"
        " (db_max_connections 50 - reserved 0)",
    ]
    assert over_budgets(settings, _facts(), 4) == []
