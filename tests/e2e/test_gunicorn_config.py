"""Migration from gunicorn through the real CLI: a gunicorn.conf.py and GUNICORN_CMD_ARGS
become settings with their source, what has no equivalent is named, a broken one is one
line and exit 2, and a master serves on what the file says. The mapping itself is
tested in tests/unit/test_gunicorn_conf.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, run_cli, wait_until

pytestmark = pytest.mark.timeout(60)

GUNICORN_CONF = """\
import multiprocessing  # names that are no setting are ignored, as gunicorn ignores them

workers = 3
bind = "0.0.0.0:9123"
timeout = 45
graceful_timeout = 20
max_requests = 1000
max_requests_jitter = 50
keepalive = 7
worker_class = "uvicorn_worker.UvicornWorker"


def on_starting(server):
    server.log.info("starting")
"""
HOOK_NOTE = (
    "asgi-supervise: gunicorn.conf.py: on_starting (a server hook) has no equivalent here: ignored"
)


def config(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    result = run_cli("config", "--json", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    return {k: (v["value"], v["source"]) for k, v in data["settings"].items()}, result.stderr


def test_config_shows_gunicorn_values_with_their_source(tmp_path: Path):
    (tmp_path / "gunicorn.conf.py").write_text(GUNICORN_CONF)
    rows, stderr = config(tmp_path, "--gunicorn-config", "gunicorn.conf.py")
    source = "file: gunicorn.conf.py"
    expected: dict[str, Any] = {
        "workers": 3, "host": "0.0.0.0", "port": 9123, "worker_timeout": 45.0,
        "graceful_timeout": 20.0, "max_requests": 1000, "max_requests_jitter": 50,
        "timeout_keep_alive": 7.0,
    }  # fmt: skip
    assert {name: rows[name] for name in expected} == {
        name: (value, source) for name, value in expected.items()
    }
    assert rows["gunicorn_config"] == ("gunicorn.conf.py", "flag: command line")
    assert stderr.splitlines() == [HOOK_NOTE]  # the worker class is Uvicorn's: no note

    # GUNICORN_CMD_ARGS over the file; ASGI_SUPERVISE_* and flags over both; the
    # project's asgi-supervise.toml under them all.
    (tmp_path / "asgi-supervise.toml").write_text("workers = 2\nbacklog = 100\nmax-requests = 5\n")
    env = {
        "GUNICORN_CMD_ARGS": "--workers 4 --timeout 50 --umask 0o22 --backlog 200",
        "ASGI_SUPERVISE_TIMEOUT_KEEP_ALIVE": "9",
    }
    rows, stderr = config(tmp_path, "--gunicorn-config", "gunicorn.conf.py", "--timeout", "60",
                          env=env)  # fmt: skip
    assert rows["workers"] == (4, "env: GUNICORN_CMD_ARGS")
    assert rows["backlog"] == (200, "env: GUNICORN_CMD_ARGS")
    assert rows["max_requests"] == (1000, source)
    assert rows["timeout_keep_alive"] == (9.0, "env: environment")
    assert rows["worker_timeout"] == (60.0, "flag: command line")
    assert stderr.splitlines() == [
        HOOK_NOTE,
        "asgi-supervise: GUNICORN_CMD_ARGS: --umask=18 has no equivalent here: ignored",
    ]
    # The text table says the same.
    result = run_cli("config", "--gunicorn-config", "gunicorn.conf.py", cwd=tmp_path)
    assert "max-requests-jitter" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("max-requests-jitter"))
    assert line.split() == ["max-requests-jitter", "=", "50", "#", "file:", "gunicorn.conf.py"]


BAD = [  # (file content or None for no file, environment, the line), through `config`
    ("timeout = 'soon'\n", {}, "timeout='soon': gunicorn rejects it"),
    (None, {}, "--gunicorn-config='g.py' (command line): gunicorn config g.py does not exist"),
    ("", {"GUNICORN_CMD_ARGS": "--workers many"}, "GUNICORN_CMD_ARGS: argument -w/--workers"),
]


def test_a_bad_gunicorn_config_is_one_line_and_exit_2(tmp_path: Path):
    path = tmp_path / "g.py"

    def check(*args: str, env: dict[str, str], message: str) -> None:
        result = run_cli(*args, "--gunicorn-config", "g.py", cwd=tmp_path, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert result.stdout == ""

    path.write_text("workers = = 2\n")  # and `run` says the same, before anything starts
    check("run", "testapp:app", env={}, message="(command line): line 1: invalid syntax")
    for content, env, message in BAD:
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_text(content)
        check("config", env=env, message=message)


def test_serves_on_the_gunicorn_files_bind_with_its_workers(supervisor, tmp_path: Path):
    """workers = 2 and bind from the file: two workers answer on that port; a SIGHUP
    re-reads the file as gunicorn's HUP does."""
    port = free_port()
    conf = tmp_path / "gunicorn.conf.py"
    body = f"wsgi_app = 'testapp:app'\nbind = '127.0.0.1:{port}'\ndef when_ready(server): pass\n"
    conf.write_text(body + "workers = 2\n")
    server = supervisor("--gunicorn-config", str(conf), port=port)
    assert len(server.serving_pids(2)) == 2
    assert len(server.worker_pids()) == 2
    assert "when_ready (a server hook) has no equivalent here: ignored" in server.log()
    conf.write_text(body + "workers = 3\n")
    server.signal(signal.SIGHUP)
    wait_until(
        lambda: f"config applied: workers 2 -> 3 (file: {conf})" in server.log(),
        20,
        lambda: f"workers 2 -> 3 from the file\n{server.log()}",
    )
    server.serving_pids(3)
