"""`asgi-supervise plan`'s output on this machine, through the CLI's `main` in-process
(conftest.run_main): text and JSON, for each profile, with --workers auto and a database
budget. The binary runs `plan` in tests/e2e/test_plan_cli.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from asgi_supervise import drain, profiles, sizing
from asgi_supervise.config import sources
from conftest import plan_text
from conftest import run_main as run_cli

pytestmark = pytest.mark.timeout(60)

BUILT_IN = profiles.names()
DECISION = re.compile(r"^=> (?P<n>\d+) (?P<noun>workers?), (?P<why>as configured|limited by \S+)$")
DB_FLAGS = ["--db-max-connections", "100", "--db-reserved-connections", "10"]
DB_FLAGS += ["--db-pool-size", "20", "--replicas", "2"]


def plan_cli(*args: str, cwd: Path) -> str:
    return plan_text(*args, cwd=cwd, runner=run_cli)


def plan_json(*args: str, cwd: Path) -> dict[str, Any]:
    return json.loads(plan_cli("--json", *args, cwd=cwd))


def auto_workers(budgets: list[dict[str, Any]], min_workers: int, max_workers: int | None) -> int:
    """What `--workers auto` decides: the tightest known budget, within min/max workers."""
    n = min(b["allows"] for b in budgets if b["allows"] is not None)
    n = max(n, min_workers)
    return n if max_workers is None else min(n, max_workers)


@pytest.mark.parametrize("profile", BUILT_IN)
def test_plan_text_for_each_profile(tmp_path: Path, profile: str):
    lines = plan_cli("--profile", profile, cwd=tmp_path).splitlines()
    assert lines[0].split() == ["budget", "allows", "detail"]
    assert [line.split()[0] for line in lines[1:4]] == ["cpu", "memory", "db"]
    assert "usable CPU" in lines[1]
    assert "limit" in lines[2] and "per worker" in lines[2]
    assert "not configured" in lines[3]  # no profile sets a database budget
    decisions = [m for line in lines if (m := DECISION.match(line))]
    assert len(decisions) == 1, lines
    (decision,) = decisions
    n = int(decision["n"])
    assert n >= 1
    assert decision["noun"] == ("worker" if n == 1 else "workers")
    settings = sources.load({}, profile=profile, environ={}, cwd=tmp_path).settings
    if settings.workers == "auto":
        assert decision["why"].startswith("limited by ")
    else:
        assert (n, decision["why"]) == (settings.workers, "as configured")


@pytest.mark.parametrize("profile", BUILT_IN)
def test_plan_json_for_each_profile(tmp_path: Path, profile: str):
    data = plan_json("--profile", profile, cwd=tmp_path)
    assert set(data) == {
        "workers", "limited_by", "budgets", "forced", "warnings", "reloads",
        "worst_case_drain_s", "drain", "memory_limit",
    }  # fmt: skip
    assert [b["name"] for b in data["budgets"]] == ["cpu", "memory", "db"]
    assert all(isinstance(b["detail"], str) and b["detail"] for b in data["budgets"])
    assert isinstance(data["workers"], int) and data["workers"] >= 1
    text = plan_cli("--profile", profile, cwd=tmp_path)
    assert f"=> {data['workers']} worker" in text  # the same decision either way
    assert f"reloads: {data['reloads']}" in text
    assert f"drain: {data['drain']}" in text
    settings = sources.load({}, profile=profile, environ={}, cwd=tmp_path).settings
    assert data["worst_case_drain_s"] == drain.of(settings).worst_case
    # And the same as the library's own plan for these settings, on this machine.
    settings = sources.load({}, profile=profile, environ={}, cwd=tmp_path).settings
    assert sizing.make_plan(settings).to_dict() == data


@pytest.mark.parametrize("profile", [*BUILT_IN, None])
def test_plan_json_workers_is_what_auto_gives(tmp_path: Path, profile: str | None):
    args = ["--workers", "auto", *(["--profile", profile] if profile else [])]
    data = plan_json(*args, cwd=tmp_path)
    settings = sources.load({"workers": "auto"}, profile=profile, environ={}, cwd=tmp_path)
    expected = auto_workers(
        data["budgets"], settings.settings.min_workers, settings.settings.max_workers
    )
    assert data["workers"] == expected
    assert data["forced"] is False
    limiting = [b["name"] for b in data["budgets"] if b["allows"] == data["workers"]]
    assert data["limited_by"] in limiting


def test_plan_auto_respects_max_workers(tmp_path: Path):
    data = plan_json("--workers", "auto", "--max-workers", "1", cwd=tmp_path)
    assert (data["workers"], data["limited_by"]) == (1, "max-workers")


def test_plan_with_a_db_budget_sizes_by_it(tmp_path: Path):
    """(100 - 10) / (2 replicas x 20) = 2 workers at most, whatever the CPUs allow."""
    data = plan_json("--workers", "auto", *DB_FLAGS, cwd=tmp_path)
    db = next(b for b in data["budgets"] if b["name"] == "db")
    assert db["allows"] == 2
    assert db["detail"] == "(100 max - 10 reserved) / (2 replicas x 20 per worker)"
    assert data["workers"] <= 2
    assert not any("connections" in w for w in data["warnings"])


def test_plan_takes_no_app(tmp_path: Path):
    result = run_cli("plan", "testapp:app", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("asgi-supervise: unrecognized arguments: testapp:app")
