"""SIGHUP and `asgi-supervise reload` re-read the config: what can change is applied,
what cannot is named and kept, and an invalid config leaves the running one alone."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import run_cli, wait_until

pytestmark = pytest.mark.timeout(90)


def _start(supervisor, tmp_path, text: str):
    conf = tmp_path / "conf.toml"
    conf.write_text(text)
    pid_file = tmp_path / "app.pid"
    server = supervisor("testapp:app", "--config", str(conf), "--pid-file", str(pid_file))
    return server, conf, pid_file


def _running(pid_file) -> dict:
    done = run_cli("config", "--running", "--json", "--pid-file", str(pid_file))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["settings"]


def _workers(pid_file) -> set[int]:
    done = run_cli("status", "--json", "--pid-file", str(pid_file))
    assert done.returncode == 0, done.stderr
    return {w["pid"] for w in json.loads(done.stdout)["workers"] if not w["stopping"]}


def _maps_pydantic(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "pydantic" in maps.read()


def test_sighup_applies_workers_log_format_and_recycling(supervisor, tmp_path):
    """Read by a child of the master (config/reader.py): the master never maps pydantic."""
    server, conf, pid_file = _start(supervisor, tmp_path, "workers = 2\n")
    server.wait_ready(2)
    assert not _maps_pydantic(server.pid)
    before = _workers(pid_file)
    conf.write_text('workers = 3\nlog_format = "json"\nmax_requests = 20\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log(), 30, lambda: f"reload\n{server.log()}")
    after = _workers(pid_file)
    assert len(after) == 3 and not after & before
    log = server.log()
    applied = next(line for line in log.splitlines() if "config applied" in line)
    assert "workers 2 -> 3" in applied and "log_format 'text' -> 'json'" in applied
    assert "max_requests None -> 20" in applied
    # The master's own lines are JSON from then on.
    later = log[log.index("config applied") :].splitlines()[1:]
    assert any(line.startswith("{") and '"event": "reload_done"' in line for line in later)
    running = _running(pid_file)
    assert running["workers"]["value"] == 3 and running["workers"]["source"].startswith("file")
    assert running["max_requests"]["value"] == 20
    assert not _maps_pydantic(server.pid)
    for _ in range(100):  # 20 requests per worker: the new limit recycles them
        server.get("/")
    wait_until(
        lambda: "due for recycling: max-requests" in server.log(),
        30,
        lambda: f"recycling by requests\n{server.log()}",
    )
    # The new workers, forked from the fork server that set up text logging at start,
    # set it up again with the new format: their access lines are JSON too.
    later = server.log()[server.log().index("config applied") :].splitlines()
    assert any(line.startswith("{") and '"logger": "uvicorn.access"' in line for line in later)


def test_invalid_config_keeps_the_running_one_with_one_message(supervisor, tmp_path):
    server, conf, pid_file = _start(supervisor, tmp_path, "workers = 2\n")
    server.wait_ready(2)
    before = _workers(pid_file)
    conf.write_text('workers = "many"\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "new config is invalid" in server.log(), 10, lambda: server.log())
    lines = [line for line in server.log().splitlines() if "new config is invalid" in line]
    assert len(lines) == 1 and "workers='many'" in lines[0] and "conf.toml" in lines[0]
    done = run_cli("reload", "--pid-file", str(pid_file))
    assert done.returncode == 1
    assert "nothing was reloaded" in done.stderr and "workers='many'" in done.stderr
    assert _workers(pid_file) == before
    assert server.serving_pids(2) == before
    assert "rolling reload" not in server.log()


def test_changed_bind_address_is_named_and_kept(supervisor, tmp_path):
    server, conf, pid_file = _start(supervisor, tmp_path, "workers = 1\n")
    server.wait_ready(1)
    conf.write_text('workers = 1\nhost = "127.0.0.2"\ngraceful_timeout = 7\n')
    done = run_cli("reload", "--pid-file", str(pid_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config applied: graceful_timeout " in done.stdout and " -> 7.0 (file: " in done.stdout
    assert "not applied without a restart" in done.stderr and "host '127.0.0.1'" in done.stderr
    kept = [line for line in server.log().splitlines() if "not applied without a restart" in line]
    assert len(kept) == 1 and "host '127.0.0.1' -> '127.0.0.2'" in kept[0]
    running = _running(pid_file)
    assert running["host"]["value"] == "127.0.0.1" and running["host"]["source"] == "default"
    assert running["graceful_timeout"]["value"] == 7
    assert server.get("/pid")[0] == 200
