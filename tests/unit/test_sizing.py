"""Sizing: cgroup reading over fake trees, and the pure budget arithmetic."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from asgi_supervise.config.settings import Settings
from asgi_supervise.sizing import Budget, Plan, make_plan, plan, usable_cpus
from asgi_supervise.sizing.facts import GIB, MIB, HostFacts
from asgi_supervise.sizing.host import parse_cpu_list, parse_proc_cgroup, read_host

CG = "sys/fs/cgroup"
V1_SENTINEL = "9223372036854771712"


def tree(
    root: Path, files: dict[str, str], meminfo_gib: int | None = 16, cpus: str = "0-7"
) -> Path:
    """A fake machine: /proc/meminfo, the online CPU list, plus the given files."""
    if meminfo_gib is not None:
        files = {
            "proc/meminfo": f"MemTotal: {meminfo_gib * 1024 * 1024} kB\nMemFree: 1 kB\n",
            **files,
        }
    files = {"sys/devices/system/cpu/online": cpus, **files}
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def v2(path: str = "/", **files: str) -> dict[str, str]:
    """A cgroup v2 tree at /sys/fs/cgroup; keys are 'dir/file' relative to the mount."""
    out = {
        "proc/self/cgroup": f"0::{path}\n",
        f"{CG}/cgroup.controllers": "cpuset cpu io memory pids",
    }
    out.update({f"{CG}/{k}": v for k, v in files.items()})
    return out


def cfg(**values: Any) -> Settings:
    return Settings.model_validate(values)


def facts(**overrides: Any) -> HostFacts:
    base = HostFacts(
        cpu_quota=None,
        cpu_quota_source="none",
        cpuset_cpus=None,
        cpuset_source="none",
        affinity_cpus=None,
        host_cpus=8,
        memory_limit=None,
        memory_limit_source="none",
        host_memory=16 * GIB,
    )
    return replace(base, **overrides)


def budget(p: Plan, name: str) -> Budget:
    return next(b for b in p.budgets if b.name == name)


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"),
    [("0-3,5", 5), ("0", 1), ("0-1", 2), ("0-3,2-5", 6), ("", None), ("\n", None), ("1,3,5\n", 3)],
)
def test_parse_cpu_list(text: str, count: int | None) -> None:
    assert parse_cpu_list(text) == count


@pytest.mark.parametrize("text", ["a-b", "3-1", "-1", "0-"])
def test_parse_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_parse_proc_cgroup_hybrid() -> None:
    text = "9:name=systemd:/\n4:memory:/process_api/ee4\n2:cpu,cpuacct:/docker/abc\n0::/\n"
    v2_path, v1 = parse_proc_cgroup(text)
    assert v2_path == "/"
    assert v1["memory"] == "/process_api/ee4"
    assert v1["cpu"] == v1["cpuacct"] == "/docker/abc"


# --- cgroup v2 ----------------------------------------------------------------------------


def test_v2_quota_cpuset_memory(tmp_path: Path) -> None:
    leaf = "kubepods/pod1"
    root = tree(
        tmp_path,
        v2(
            f"/{leaf}",
            **{
                f"{leaf}/cpu.max": "150000 100000\n",
                f"{leaf}/cpuset.cpus.effective": "0-3,5\n",
                f"{leaf}/memory.max": f"{GIB}\n",
            },
        ),
    )
    f = read_host(root)
    assert f.cpu_quota == 1.5
    assert f.cpu_quota_source == "cgroup v2 cpu.max 150000/100000 at /sys/fs/cgroup/kubepods/pod1"
    assert f.cpuset_cpus == 5
    assert "cpuset.cpus.effective 0-3,5" in f.cpuset_source
    assert f.memory_limit == GIB
    assert f.memory_limit_source == "cgroup v2 memory.max at /sys/fs/cgroup/kubepods/pod1"
    assert f.host_cpus == 8
    assert f.host_memory == 16 * GIB
    assert f.affinity_cpus is None  # fake root: affinity only when injected
    assert f.notes == ()


def test_v2_parent_tighter_than_leaf(tmp_path: Path) -> None:
    files = {
        "kubepods/cpu.max": "100000 100000",
        "kubepods/memory.max": str(512 * MIB),
        "kubepods/pod1/cpu.max": "400000 100000",
        "kubepods/pod1/memory.max": "max",
        "kubepods/pod1/c1/cpu.max": "max 100000",
    }
    f = read_host(tree(tmp_path, v2("/kubepods/pod1/c1", **files)))
    assert f.cpu_quota == 1.0
    assert f.cpu_quota_source.endswith("at /sys/fs/cgroup/kubepods")
    assert f.memory_limit == 512 * MIB
    assert f.memory_limit_source.endswith("at /sys/fs/cgroup/kubepods")


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    files = {"app/cpu.max": "max 100000", "app/memory.max": "max"}
    f = read_host(tree(tmp_path, v2("/app", **files)))
    assert (f.cpu_quota, f.memory_limit) == (None, None)
    assert f.cpu_quota_source == "none"


def test_v2_namespaced_root_reads_mount_files(tmp_path: Path) -> None:
    """In a container with a cgroup namespace, /proc/self/cgroup says 0::/ and the mount
    root is the container's own cgroup, so its files carry the limits."""
    files = {"cpu.max": "50000 100000", "memory.max": str(GIB), "cpuset.cpus.effective": "0-1"}
    f = read_host(tree(tmp_path, v2("/", **files)))
    assert f.cpu_quota == 0.5
    assert f.cpu_quota_source == "cgroup v2 cpu.max 50000/100000 at /sys/fs/cgroup"
    assert f.memory_limit == GIB
    assert f.cpuset_cpus == 2


@pytest.mark.parametrize("path", ["/not/visible/here", "/../../outside"])
def test_v2_invisible_path_falls_back_to_mount_root(tmp_path: Path, path: str) -> None:
    f = read_host(tree(tmp_path, v2(path, **{"cpu.max": "200000 100000"})))
    assert f.cpu_quota == 2.0


def test_v2_memory_at_or_above_host_memory_ignored(tmp_path: Path) -> None:
    files = {"app/memory.max": str(64 * GIB)}
    f = read_host(tree(tmp_path, v2("/app", **files), meminfo_gib=16))
    assert f.memory_limit is None


# --- cgroup v1 and hybrid -----------------------------------------------------------------


@pytest.mark.parametrize("cpu_dir", ["cpu,cpuacct", "cpu", "cpuacct,cpu"])
def test_v1_controllers(tmp_path: Path, cpu_dir: str) -> None:
    proc = "7:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n"
    files = {
        "proc/self/cgroup": proc,
        f"{CG}/{cpu_dir}/docker/abc/cpu.cfs_quota_us": "50000",
        f"{CG}/{cpu_dir}/docker/abc/cpu.cfs_period_us": "100000",
        f"{CG}/{cpu_dir}/cpu.cfs_quota_us": "-1",
        f"{CG}/cpuset/docker/abc/cpuset.effective_cpus": "0-2",
        f"{CG}/memory/docker/abc/memory.limit_in_bytes": str(768 * MIB),
        f"{CG}/memory/memory.limit_in_bytes": V1_SENTINEL,
    }
    f = read_host(tree(tmp_path, files))
    assert f.cpu_quota == 0.5
    assert f.cpu_quota_source == (
        f"cgroup v1 cpu.cfs_quota_us 50000/100000 at /sys/fs/cgroup/{cpu_dir}/docker/abc"
    )
    assert f.cpuset_cpus == 3
    assert f.memory_limit == 768 * MIB
    assert "cgroup v1 memory.limit_in_bytes" in f.memory_limit_source


def test_v1_minus_one_and_sentinel_are_no_limit(tmp_path: Path) -> None:
    files = {
        "proc/self/cgroup": "4:cpu,cpuacct:/a\n7:memory:/a\n",
        f"{CG}/cpu,cpuacct/a/cpu.cfs_quota_us": "-1",
        f"{CG}/cpu,cpuacct/a/cpu.cfs_period_us": "100000",
        f"{CG}/memory/a/memory.limit_in_bytes": V1_SENTINEL,
        f"{CG}/memory/memory.limit_in_bytes": str(2**62 + 4096),
    }
    f = read_host(tree(tmp_path, files))
    assert (f.cpu_quota, f.memory_limit) == (None, None)


def test_v1_cpuset_cpus_when_no_effective_file(tmp_path: Path) -> None:
    files = {"proc/self/cgroup": "3:cpuset:/\n", f"{CG}/cpuset/cpuset.cpus": "0-3,5"}
    assert read_host(tree(tmp_path, files)).cpuset_cpus == 5


def test_v1_container_whose_mount_root_is_its_cgroup(tmp_path: Path) -> None:
    """Docker on v1 without a cgroup namespace: the path names a host cgroup that is not
    under the container's mount, whose root already is the container's cgroup."""
    files = {
        "proc/self/cgroup": "7:memory:/docker/abc\n",
        f"{CG}/memory/memory.limit_in_bytes": str(GIB),
    }
    assert read_host(tree(tmp_path, files)).memory_limit == GIB


def test_hybrid_host_like_this_one(tmp_path: Path) -> None:
    """v1 controllers plus an empty v2 'unified' mount; limits live in v1."""
    proc = "9:name=systemd:/\n4:memory:/process_api/x\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n"
    files = {
        "proc/self/cgroup": proc,
        f"{CG}/unified/cgroup.controllers": "",
        f"{CG}/cpu/cpu.cfs_quota_us": "250000",
        f"{CG}/cpu/cpu.cfs_period_us": "100000",
        f"{CG}/cpuacct/cpuacct.usage": "0",
        f"{CG}/cpuset/cpuset.effective_cpus": "0-1",
        f"{CG}/memory/process_api/memory.limit_in_bytes": str(2 * GIB),
        f"{CG}/memory/process_api/x/memory.limit_in_bytes": V1_SENTINEL,
    }
    f = read_host(tree(tmp_path, files))
    assert f.cpu_quota == 2.5
    assert f.cpuset_cpus == 2
    assert f.memory_limit == 2 * GIB
    assert f.memory_limit_source.endswith("at /sys/fs/cgroup/memory/process_api")


def test_hybrid_takes_the_tightest_of_both_hierarchies(tmp_path: Path) -> None:
    files = {
        **v2("/", **{"cpu.max": "300000 100000"}),
        "proc/self/cgroup": "1:cpu:/\n0::/\n",
        f"{CG}/cpu/cpu.cfs_quota_us": "150000",
    }
    f = read_host(tree(tmp_path, files))
    assert f.cpu_quota == 1.5
    assert f.cpu_quota_source.startswith("cgroup v1")


# --- malformed, missing, injected ---------------------------------------------------------


def test_malformed_files_are_skipped_and_noted(tmp_path: Path) -> None:
    files = {
        "app/cpu.max": "lots 100000",
        "app/memory.max": "-5",
        "app/cpuset.cpus.effective": "a-b",
        "cpu.max": "100000 0",
        "memory.max": str(GIB),
        "cpuset.cpus.effective": "0-3",
    }
    f = read_host(tree(tmp_path, v2("/app", **files)))
    assert f.cpu_quota is None  # leaf garbage and root period 0 are both ignored
    assert f.memory_limit == GIB
    assert f.cpuset_cpus == 4
    assert len(f.notes) == 4
    assert all(n.startswith("ignored malformed cgroup v2 file") for n in f.notes)
    assert any("/sys/fs/cgroup/app" in n for n in f.notes)
    # notes surface as plan warnings
    assert set(f.notes) <= set(plan(cfg(workers="auto"), f).warnings)


def test_unreadable_file_is_no_limit(tmp_path: Path) -> None:
    root = tree(tmp_path, v2("/"))
    (root / CG / "cpu.max").mkdir()  # reading a directory raises IsADirectoryError
    (root / CG / "memory.max").write_bytes(b"\xff\xfe\x00")
    f = read_host(root)
    assert (f.cpu_quota, f.memory_limit) == (None, None)


def test_empty_or_garbage_machine_never_raises(tmp_path: Path) -> None:
    f = read_host(tmp_path)
    assert (f.cpu_quota, f.cpuset_cpus, f.memory_limit, f.host_memory) == (None, None, None, 0)
    assert f.host_cpus >= 1
    tree(tmp_path, {"proc/self/cgroup": "\x00garbage::\n::::\n", "proc/meminfo": "MemTotal: x"})
    (tmp_path / "sys/devices/system/cpu/online").write_text("nonsense")
    f = read_host(tmp_path)
    assert (f.host_memory, f.host_cpus) == (0, 1)


def test_affinity_is_injected_for_fake_roots(tmp_path: Path) -> None:
    assert read_host(tree(tmp_path, v2("/")), affinity=3).affinity_cpus == 3


def test_real_machine_reads_without_error() -> None:
    f = read_host()
    assert f.host_cpus >= 1 and f.host_memory > 0
    if hasattr(os, "sched_getaffinity"):
        assert f.affinity_cpus == len(os.sched_getaffinity(0))
    json.dumps(f.to_dict())


# --- cpu budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quota", "per_core", "allows"),
    [(1.5, 1.0, 1), (0.5, 1.0, 1), (0.1, 1.0, 1), (2.0, 1.0, 2), (2.5, 2.0, 5), (1.5, 0.5, 1)],
)
def test_cpu_budget_rounds_down_min_one(quota: float, per_core: float, allows: int) -> None:
    f = facts(cpu_quota=quota, cpu_quota_source="cgroup v2 cpu.max")
    p = plan(cfg(workers="auto", cpu_workers_per_core=per_core), f)
    assert budget(p, "cpu").allows == allows


def test_cpu_detail_names_input_and_source() -> None:
    f = facts(cpu_quota=1.5, cpu_quota_source="cgroup v2 cpu.max 150000/100000 at /sys/fs/cgroup")
    p = plan(cfg(workers="auto"), f)
    assert budget(p, "cpu").detail == (
        "1.5 usable CPUs (cgroup v2 cpu.max 150000/100000 at /sys/fs/cgroup), rounded down"
    )
    assert (p.workers, p.limited_by, p.forced) == (1, "cpu", False)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, (8, "host CPU count")),
        ({"cpu_quota": 3.0, "cpu_quota_source": "q"}, (3.0, "q")),
        ({"cpuset_cpus": 2, "cpuset_source": "set", "cpu_quota": 3.0}, (2, "set")),
        ({"affinity_cpus": 1, "cpuset_cpus": 2}, (1, "sched_getaffinity")),
    ],
)
def test_usable_cpus_is_the_tightest(overrides: dict[str, Any], expected: tuple) -> None:
    assert usable_cpus(facts(**overrides)) == expected


# --- memory budget ------------------------------------------------------------------------


def test_memory_budget_keeps_a_spare_and_the_master() -> None:
    f = facts(cpu_quota=16.0, memory_limit=GIB, memory_limit_source="cgroup v2 memory.max")
    p = plan(cfg(workers="auto", worker_memory_estimate=256), f)
    mem = budget(p, "memory")
    # (1024 - 64) // 256 = 3 workers fit, minus 1 spare for replacements
    assert mem.allows == 2
    assert mem.detail.startswith("1.0 GiB limit (cgroup v2 memory.max), 64 MiB kept for the master")
    assert "256 MiB per worker, 1 spare for replacements" in mem.detail
    assert (p.workers, p.limited_by) == (2, "memory")


def test_memory_spare_follows_reload_surge() -> None:
    f = facts(cpu_quota=16.0, memory_limit=2 * GIB, memory_limit_source="m")
    p = plan(cfg(workers="auto", worker_memory_estimate=256, reload_surge=2), f)
    assert budget(p, "memory").allows == (2048 - 64) // 256 - 2


def test_memory_uses_host_memory_without_limit() -> None:
    p = plan(cfg(workers="auto"), facts(host_memory=4 * GIB))
    assert budget(p, "memory").allows == (4096 - 64) // 256 - 1
    assert "host memory, no cgroup limit" in budget(p, "memory").detail


def test_memory_unknown_is_no_budget() -> None:
    p = plan(cfg(workers="auto"), facts(host_memory=0))
    assert budget(p, "memory").allows is None
    assert p.limited_by == "cpu"


@pytest.mark.parametrize(
    ("limit_mib", "needle"), [(400, "1 worker + 1 replacement"), (200, "1 worker of")]
)
def test_memory_too_small_still_one_worker_with_warning(limit_mib: int, needle: str) -> None:
    f = facts(memory_limit=limit_mib * MIB, memory_limit_source="cgroup v2 memory.max")
    p = plan(cfg(workers="auto"), f)
    assert p.workers == 1
    assert any(w.startswith("memory: ") and needle in w for w in p.warnings)


# --- db budget ----------------------------------------------------------------------------

DB = {"db_max_connections": 100, "db_reserved_connections": 10, "db_pool_size": 20, "replicas": 2}


def test_db_budget() -> None:
    p = plan(cfg(workers="auto", **DB), facts())
    db = budget(p, "db")
    assert db.allows == 2
    assert db.detail == "(100 max - 10 reserved) / (2 replicas x 20 per worker)"
    assert (p.workers, p.limited_by) == (2, "db")


def test_db_budget_zero_is_one_with_warning() -> None:
    values = {**DB, "replicas": 5}  # 90 // 100 = 0
    p = plan(cfg(workers="auto", **values), facts())
    assert budget(p, "db").allows == 1 and p.workers == 1
    assert (
        "db: even 1 worker x 20 connections x 5 replicas = 100 > 90 available"
        " (db_max_connections 100 - reserved 10)"
    ) in p.warnings


@pytest.mark.parametrize(
    ("values", "missing"),
    [({"db_pool_size": 20}, "db_max_connections"), ({"db_max_connections": 100}, "db_pool_size")],
)
def test_db_half_configured_warns(values: dict[str, int], missing: str) -> None:
    p = plan(cfg(workers="auto", **values), facts())
    assert budget(p, "db").allows is None
    assert any(w.startswith(f"{missing} is not set") for w in p.warnings)


def test_db_unconfigured_is_silent() -> None:
    p = plan(cfg(workers="auto"), facts())
    assert budget(p, "db").allows is None and p.warnings == ()


# --- how reloads replace workers ----------------------------------------------------------


def test_reloads_replace_first_when_the_budgets_hold_the_surge() -> None:
    p = plan(cfg(workers=2, reload_surge=2, db_max_connections=100, db_pool_size=20), facts())
    assert p.reloads == "replacement first, 2 at a time (--reload-surge)"
    assert "reloads: replacement first, 2 at a time (--reload-surge)" in p.render().splitlines()


def test_reloads_drain_first_when_the_database_share_holds_no_more_pools() -> None:
    """#4's budget: 2 workers x 20 connections of this instance's 45. A replacement beside
    its old worker would take a third pool, 60 > 45: each worker drains first instead."""
    p = plan(cfg(workers="auto", **DB), facts())
    assert (p.workers, p.limited_by) == (2, "db")
    assert p.reloads == (
        "drain first, 1 at a time: the db budget holds no more"
        " (2 workers x 20 connections of this instance's 45)"
    )


def test_gunicorn_engine_reloads_every_worker_at_once_and_says_what_does_not_fit() -> None:
    p = plan(cfg(workers=2, engine="gunicorn"), facts())
    assert p.reloads == "gunicorn: all 2 new workers at once beside the old ones"
    p = plan(cfg(workers=2, engine="gunicorn", db_max_connections=50, db_pool_size=20), facts())
    assert p.reloads == (
        "gunicorn: all 2 new workers at once beside the old ones, though the db budget holds"
        " 0 more (2 workers x 20 connections of this instance's 50)"
    )


def test_reloads_replace_first_only_as_many_as_the_room_allows() -> None:
    p = plan(cfg(workers=1, reload_surge=3, **DB), facts())  # 45 // 20 = 2 pools: 1 more
    assert p.reloads == (
        "replacement first, 1 at a time: the db budget holds 1 more"
        " (1 worker x 20 connections of this instance's 45)"
    )


def test_reloads_with_reload_on_ignore_the_database_share() -> None:
    """A config file's production budget must not make a development save drain first."""
    p = plan(cfg(workers="auto", reload=True, **DB), facts())
    assert p.reloads == "replacement first, 1 at a time (--reload-surge)"


def test_reloads_under_a_memory_limit_the_worker_count_leaves_full() -> None:
    f = facts(memory_limit=GIB, memory_limit_source="cgroup v2 memory.max")
    assert plan(cfg(workers="auto"), f).reloads.startswith("replacement first, 1 at a time")
    # (1024 - 64 - 32) // 256 = 3 fit: none more
    assert plan(cfg(workers=3), f).reloads == (
        "drain first, 1 at a time: the memory budget holds no more (3 workers x 256 MiB"
        " + 64 MiB master + 32 MiB fork server of 1.0 GiB (cgroup v2 memory.max))"
    )


# --- auto, clamps, fixed ------------------------------------------------------------------


def test_auto_clamped_to_max_workers() -> None:
    p = plan(cfg(workers="auto", max_workers=3), facts())
    assert (p.workers, p.limited_by, p.forced) == (3, "max-workers", False)


def test_auto_forced_up_to_min_workers_warns() -> None:
    f = facts(cpu_quota=1.5, cpu_quota_source="cgroup v2 cpu.max 150000/100000")
    p = plan(cfg(workers="auto", min_workers=3), f)
    assert (p.workers, p.limited_by, p.forced) == (3, "min-workers", True)
    assert p.warnings == (
        "min_workers 3 overrides the cpu budget: 3 workers > 1.5 usable CPUs"
        " (cgroup v2 cpu.max 150000/100000)",
    )


def test_auto_min_workers_below_budgets_changes_nothing() -> None:
    p = plan(cfg(workers="auto", min_workers=2), facts(cpu_quota=4.0, cpu_quota_source="q"))
    assert (p.workers, p.limited_by, p.forced, p.warnings) == (4, "cpu", False, ())


def test_fixed_workers_warn_with_numbers() -> None:
    f = facts(
        cpu_quota=1.5,
        cpu_quota_source="cgroup v2 cpu.max 150000/100000",
        memory_limit=GIB,
        memory_limit_source="cgroup v2 memory.max",
    )
    p = plan(cfg(workers=8, **DB), f)
    assert (p.workers, p.limited_by, p.forced) == (8, "configured", True)
    assert p.warnings == (
        "8 workers > 1.5 usable CPUs (cgroup v2 cpu.max 150000/100000)",
        "8 workers x 256 MiB + 1 spare + 64 MiB master + 32 MiB fork server = 2.3 GiB"
        " > 1.0 GiB limit"
        " (cgroup v2 memory.max)",
        "8 workers x 20 connections x 2 replicas = 320 > 90 available"
        " (db_max_connections 100 - reserved 10)",
    )


def test_fixed_workers_cpu_warning_with_per_core() -> None:
    f = facts(cpu_quota=1.5, cpu_quota_source="q")
    p = plan(cfg(workers=4, cpu_workers_per_core=2), f)
    assert p.warnings == ("4 workers > 3 = 1.5 usable CPUs (q) x 2 per core",)


def test_fixed_workers_within_budgets_no_warning() -> None:
    p = plan(cfg(workers=2, **DB), facts())
    assert p.workers == 2 and p.warnings == ()


# --- output -------------------------------------------------------------------------------


def test_render_and_to_dict() -> None:
    f = facts(cpu_quota=1.5, cpu_quota_source="cgroup v2 cpu.max 150000/100000")
    p = plan(cfg(workers="auto", db_pool_size=5), f)
    text = p.render()
    lines = text.splitlines()
    assert lines[0].split() == ["budget", "allows", "detail"]
    assert lines[1].startswith("cpu          1  1.5 usable CPUs")
    assert lines[3].startswith("db           -  not configured")
    assert "=> 1 worker, limited by cpu" in lines
    assert lines[-1].startswith("warning: db_max_connections is not set")
    data = json.loads(json.dumps(p.to_dict()))
    assert data["workers"] == 1 and data["limited_by"] == "cpu" and data["forced"] is False
    assert [b["name"] for b in data["budgets"]] == ["cpu", "memory", "db"]
    assert data["budgets"][0] == {"name": "cpu", "allows": 1, "detail": budget(p, "cpu").detail}
    assert data["warnings"] == list(p.warnings)
    assert data["reloads"] == p.reloads == "replacement first, 1 at a time (--reload-surge)"


def test_render_plural_and_configured() -> None:
    assert "=> 4 workers, as configured" in plan(cfg(workers=4), facts()).render()
    assert (
        "=> 3 workers, limited by max-workers"
        in plan(cfg(workers="auto", max_workers=3), facts()).render()
    )


def test_make_plan_reads_the_tree(tmp_path: Path) -> None:
    root = tree(
        tmp_path, v2("/app", **{"app/cpu.max": "150000 100000", "app/memory.max": str(GIB)})
    )
    p = make_plan(cfg(workers="auto"), root)
    assert (p.workers, p.limited_by) == (1, "cpu")
    assert "at /sys/fs/cgroup/app" in budget(p, "cpu").detail


# --- properties ---------------------------------------------------------------------------

host_facts = st.builds(
    HostFacts,
    cpu_quota=st.none() | st.floats(0.01, 128, allow_nan=False),
    cpu_quota_source=st.just("q"),
    cpuset_cpus=st.none() | st.integers(1, 256),
    cpuset_source=st.just("s"),
    affinity_cpus=st.none() | st.integers(1, 256),
    host_cpus=st.integers(1, 512),
    memory_limit=st.none() | st.integers(MIB, 2**40),
    memory_limit_source=st.just("m"),
    host_memory=st.integers(0, 2**41),
)


@st.composite
def sizing_settings(draw: st.DrawFn, auto: bool = False) -> Settings:
    min_workers = draw(st.integers(1, 8))
    most = draw(st.none() | st.integers(1, 10_000))
    reserved = draw(st.integers(0, 200 if most is None else min(200, most - 1)))  # below max
    values: dict[str, Any] = {
        "workers": "auto" if auto else draw(st.just("auto") | st.integers(1, 64)),
        "min_workers": min_workers,
        "max_workers": draw(st.none() | st.integers(min_workers, 64)),
        "worker_memory_estimate": draw(st.integers(1, 8192)),
        "cpu_workers_per_core": draw(st.floats(0.1, 8, allow_nan=False)),
        "db_max_connections": most,
        "db_reserved_connections": reserved,
        "db_pool_size": draw(st.none() | st.integers(1, 100)),
        "replicas": draw(st.integers(1, 20)),
        "reload_surge": draw(st.integers(1, 4)),
    }
    return cfg(**values)


@hyp_settings(max_examples=300, deadline=None)
@given(sizing_settings(), host_facts)
def test_property_at_least_one_and_serialisable(s: Settings, f: HostFacts) -> None:
    p = plan(s, f)
    assert p.workers >= 1
    assert all(b.allows is None or b.allows >= 1 for b in p.budgets)
    assert f"=> {p.workers} worker" in p.render()
    json.dumps(p.to_dict())
    if s.workers != "auto":
        assert p.workers == s.workers and p.forced


@hyp_settings(max_examples=300, deadline=None)
@given(sizing_settings(auto=True), host_facts)
def test_property_auto_never_exceeds_a_budget(s: Settings, f: HostFacts) -> None:
    s = s.model_copy(update={"min_workers": 1})
    p = plan(s, f)
    assert not p.forced
    for b in p.budgets:
        if b.allows is not None:
            assert p.workers <= b.allows, (b, p)
    assert p.workers == min(b.allows for b in p.budgets if b.allows is not None) or (
        p.limited_by == "max-workers" and p.workers == s.max_workers
    )


def test_memory_budget_keeps_room_for_a_reloads_fork_server() -> None:
    """A reload's new fork server boots beside the old generation: with --preload it holds
    the app as a worker does; in exec mode there is none."""
    f = facts(memory_limit=GIB, memory_limit_source="cgroup v2 memory.max")
    exec_mode = budget(plan(cfg(workers="auto", worker_start="exec"), f), "memory")
    forking = budget(plan(cfg(workers="auto"), f), "memory")
    preload = budget(plan(cfg(workers="auto", preload=True), f), "memory")
    # (1024 - 64) // 256 - 1 = 2; (1024 - 64 - 32) // 256 - 1 = 2; (1024 - 64 - 256) // 256 - 1 = 1
    assert (exec_mode.allows, forking.allows, preload.allows) == (2, 2, 1)
    assert "fork server" not in exec_mode.detail
    assert "64 MiB kept for the master and 256 MiB for a fork server" in preload.detail
