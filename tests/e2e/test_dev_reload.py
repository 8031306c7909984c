"""`--reload` restarts on save, replacement first, never without a server."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest
from loadgen import Load

from conftest import APPS, try_get, wait_until

pytestmark = pytest.mark.timeout(60)
ENV = {"PYTHONDONTWRITEBYTECODE": "1"}


def _version_app(tmp_path: Path, version: str) -> Path:
    source = tmp_path / "devapp.py"
    text = (APPS / "testapp.py").read_text()
    source.write_text(text.replace('os.environ.get("TESTAPP_VERSION", "1")', repr(version)))
    return source


def _version(server) -> str | None:
    answer = try_get(server.port, "/version", timeout=1.0)
    return answer[1] if answer and answer[0] == 200 else None


def _start(supervisor, tmp_path: Path, *extra: str, delay: str = "0.1"):
    _version_app(tmp_path, "v1")
    server = supervisor(
        "devapp:app", "--reload", "--app-dir", str(tmp_path), "--reload-dir", str(tmp_path),
        "--reload-delay", delay, *extra, env=ENV,
    )  # fmt: skip
    server.wait_ready(1)
    wait_until(lambda: "watching" in server.log(), 15, "the watcher to start")
    return server


def test_editing_the_app_changes_the_response(supervisor, tmp_path):
    """How fast is bench's `reload-latency`; here: the save, and only it, restarts."""
    server = _start(supervisor, tmp_path)
    assert _version(server) == "v1"
    assert "rolling reload" not in server.log()
    _version_app(tmp_path, "v2")
    wait_until(lambda: _version(server) == "v2", 15, "the new version to answer")
    reloads = [line for line in server.log().splitlines() if "rolling reload" in line]
    assert len(reloads) == 1 and "devapp.py changed" in reloads[0], reloads


def test_a_save_does_not_wait_for_the_previous_worker_to_drain(supervisor, tmp_path):
    """The worker replaced by the first save is held draining by an idle keep-alive
    connection for --timeout-keep-alive (60 s); the second save is served while it lives."""
    server = _start(supervisor, tmp_path, "--graceful-timeout", "90", "--timeout-keep-alive", "60")
    browser = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        browser.request("GET", "/pid")
        held = int(browser.getresponse().read())  # and the connection stays open
        _version_app(tmp_path, "v2")
        wait_until(lambda: _version(server) == "v2", 15, "the first save to be served")
        wait_until(lambda: f"(pid {held}) stopping" in server.log(), 15, "v1's worker to drain")
        _version_app(tmp_path, "v3")
        wait_until(lambda: _version(server) == "v3", 15, "the second save to be served")
        # Waiting for the drain would have held v3 back until the held connection closed.
        assert held in server.worker_pids(), "the v1 worker stopped: nothing held it"
        assert f"(pid {held}) exited" not in server.log()
    finally:
        browser.close()


def test_a_save_starts_the_new_worker_first_whatever_the_database_share(supervisor, tmp_path):
    """A config whose database share holds one pool (production's budget) would drain the
    only worker first; under --reload the new one starts beside it: 2 workers at once.

    The master's log is the evidence: the replacement's "booting" comes before the old
    worker's "stopping". (Sampling the process count misses the overlap: a forked
    replacement is ready in tens of milliseconds.)"""
    db = ("--db-max-connections", "10", "--db-pool-size", "10")
    server = _start(supervisor, tmp_path, *db)
    (old,) = server.worker_pids()
    _version_app(tmp_path, "v2")
    wait_until(lambda: _version(server) == "v2", 15, "the new version to answer")
    wait_until(lambda: f"(pid {old}) stopping" in server.log(), 15, "the old worker to stop")
    log = server.log()
    reload_at = log.index("rolling reload")
    booted = [line for line in log[reload_at:].splitlines() if line.endswith(" booting")]
    assert booted and f"(pid {old})" not in booted[0], booted
    assert log.index(booted[0], reload_at) < log.index(f"(pid {old}) stopping")
    assert "draining it first" not in log


def test_syntax_error_keeps_the_old_version_serving_until_fixed(supervisor, tmp_path):
    server = _start(supervisor, tmp_path)
    source = tmp_path / "devapp.py"
    with Load(server.port, rate=100, path="/version") as load:
        load.wait_for_requests(50)
        source.write_text(source.read_text() + "\ndef broken(:\n")
        wait_until(lambda: "reload aborted" in server.log(), 10, "the broken reload to abort")
        load.wait_for_requests(load.stats.total + 100)
        stats = load.stop()
    assert stats.failed == 0, (stats.failures, stats.examples)
    assert _version(server) == "v1"
    assert "SyntaxError" in server.log()
    _version_app(tmp_path, "v3")
    wait_until(lambda: _version(server) == "v3", 15, "the fixed version")


def test_a_burst_of_saves_restarts_once_or_twice(supervisor, tmp_path):
    """A quiet time of 1 s ends a burst: a busy machine may stall the 20 writes by more
    than 0.1 s, but not by a second, so 20 saves must not make more than 2 reloads."""
    server = _start(supervisor, tmp_path, delay="1.0")
    for i in range(20):
        _version_app(tmp_path, f"burst-{i}")
        time.sleep(0.01)  # the scenario: an editor saving 20 times in 0.2 s
    wait_until(lambda: _version(server) == "burst-19", 15, "the last save to be served")

    def settled() -> bool:
        log = server.log()
        return log.rfind("reload complete") > log.rfind("rolling reload")

    wait_until(settled, 15, "the last reload that started to complete")
    assert 1 <= server.log().count("rolling reload") <= 2


def test_excluded_files_do_not_trigger_a_restart(supervisor, tmp_path):
    server = _start(supervisor, tmp_path, "--reload-exclude", "ignored_*.py")
    (tmp_path / "ignored_scratch.py").write_text("x = 1\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "site.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    (tmp_path / "watched.py").write_text("x = 1\n")  # the control: this one must trigger
    wait_until(lambda: "rolling reload" in server.log(), 15, "the watched file's reload")
    reloads = [line for line in server.log().splitlines() if "rolling reload" in line]
    assert len(reloads) == 1 and "watched.py changed" in reloads[0], reloads
