"""`asgi-supervise plan` through the binary, and sizing warnings at start.

The plan's output for each profile and budget is checked in-process in
tests/unit/test_plan_output.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import plan_text, run_cli, wait_until

pytestmark = pytest.mark.timeout(60)

DB_FLAGS = ["--db-max-connections", "100", "--db-reserved-connections", "10"]
DB_FLAGS += ["--db-pool-size", "20", "--replicas", "2"]
DB_WARNING = "8 workers x 20 connections x 2 replicas = 320 > 90 available"


def plan_cli(*args: str, cwd: Path) -> str:
    return plan_text(*args, cwd=cwd)


def plan_json(*args: str, cwd: Path) -> dict[str, Any]:
    return json.loads(plan_cli("--json", *args, cwd=cwd))


def test_plan_warns_when_fixed_workers_exceed_the_db_budget(tmp_path: Path):
    text = plan_cli("--workers", "8", *DB_FLAGS, cwd=tmp_path)
    assert "=> 8 workers, as configured" in text
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert sum(DB_WARNING in w for w in warnings) == 1, text
    data = plan_json("--workers", "8", *DB_FLAGS, cwd=tmp_path)
    assert (data["workers"], data["limited_by"], data["forced"]) == (8, "configured", True)
    assert sum(DB_WARNING in w for w in data["warnings"]) == 1, data["warnings"]


def test_plan_with_bad_input_is_a_usage_error(tmp_path: Path):
    result = run_cli("plan", "--db-pool-size", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "asgi-supervise: --db-pool-size='0' (command line): expected an integer >= 1"
    ]
    assert result.stdout == ""


def test_start_with_too_many_db_connections_warns_once_and_starts(supervisor):
    """3 workers x 5 connections = 15 > 10: said once at start, and all 3 still start."""
    server = supervisor(
        "testapp:app", "--workers", "3", "--db-max-connections", "10", "--db-pool-size", "5"
    )
    server.wait_ready(3)
    wait_until(lambda: len(server.worker_pids()) == 3, 10, "3 worker processes")
    warning = "3 workers x 5 connections x 1 replica = 15 > 10 available"
    log = server.log()
    assert log.count(warning) == 1, log
    line = next(line for line in log.splitlines() if warning in line)
    assert "WARNING" in line and "sizing: " in line
    assert "Traceback" not in log
