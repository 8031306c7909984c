"""Real processes in real cgroups: does read_host see the quota the kernel enforces?

Each test builds ``asgi-supervise-test-<pid>/inner`` with the limit on the *parent*, moves
a fresh Python process into ``inner`` and lets it call ``read_host()``: so the walk up the
hierarchy is exercised too. The last test runs a whole master under a real memory limit.
Needs root and a writable cgroup filesystem; skips otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_supervise.config.settings import Settings
from asgi_supervise.sizing import plan
from asgi_supervise.sizing.facts import MIB, HostFacts
from conftest import free_port, get, in_cgroups, wait_until

CGROUP = Path("/sys/fs/cgroup")
NAME = f"asgi-supervise-test-{os.getpid()}"

# What runs inside the cgroups: read_host() itself, and the real `asgi-supervise plan`.
READ_HOST = (
    "import json; from asgi_supervise.sizing.host import read_host; "
    "print(json.dumps(read_host().to_dict()))"
)
PLAN = (
    "-m", "asgi_supervise", "plan", "--json", "--workers", "auto",
    "--worker-memory-estimate", "128",
)  # fmt: skip


def _output_inside(procs: tuple[Path, ...], *python_args: str) -> Any:
    """JSON printed by a fresh Python process that ran inside the cgroups."""
    out = subprocess.run(
        in_cgroups(procs, *python_args),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
        cwd="/",  # no asgi-supervise.toml or pyproject.toml of ours in the way
    )
    return json.loads(out.stdout)


def _run_plan_cli(*procs: Path) -> dict:
    return _output_inside(procs, *PLAN)


def _need_root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:  # one write() per value, as the cgroup files expect
        f.write(text)


def _rmdir(path: Path) -> None:
    for _ in range(50):  # an exited process may take a moment to leave the cgroup
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


@contextlib.contextmanager
def _nested(mount: Path) -> Iterator[tuple[Path, Path]]:
    parent = mount / NAME
    inner = parent / "inner"
    try:
        parent.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc}")
    try:
        yield parent, inner
    finally:
        _rmdir(inner)
        _rmdir(parent)


def _run_child(*procs: Path) -> HostFacts:
    data = _output_inside(procs, "-c", READ_HOST)
    return HostFacts(**{**data, "notes": tuple(data["notes"])})


@pytest.mark.timeout(30)
def test_v2_cpu_max_is_read_from_inside_the_cgroup() -> None:
    _need_root()
    mount = next(
        (m for m in (CGROUP, CGROUP / "unified") if (m / "cgroup.controllers").is_file()), None
    )
    if mount is None:
        pytest.skip("no cgroup v2 filesystem at /sys/fs/cgroup or /sys/fs/cgroup/unified")
    controllers = (mount / "cgroup.controllers").read_text().split()
    if "cpu" not in controllers:
        pytest.skip(
            f"cgroup v2 at {mount} offers controllers {controllers}: no 'cpu'"
            " (on a hybrid host the cpu controller is bound to the v1 hierarchy)"
        )
    enabled_here = False
    if "cpu" not in (mount / "cgroup.subtree_control").read_text().split():
        try:
            _write(mount / "cgroup.subtree_control", "+cpu")
            enabled_here = True
        except OSError as exc:  # e.g. EBUSY: "no internal processes" in a non-root cgroup
            pytest.skip(f"cannot enable +cpu in {mount}/cgroup.subtree_control: {exc}")
    try:
        with _nested(mount) as (parent, inner):
            try:
                _write(parent / "cpu.max", "150000 100000")
                _write(parent / "cgroup.subtree_control", "+cpu")  # parent holds no processes
                inner.mkdir()
            except OSError as exc:
                pytest.skip(f"cannot set up the cgroup v2 sub-hierarchy {parent}: {exc}")
            facts = _run_child(inner / "cgroup.procs")
    finally:
        if enabled_here:
            with contextlib.suppress(OSError):
                _write(mount / "cgroup.subtree_control", "-cpu")
    assert facts.cpu_quota == 1.5
    assert f"cpu.max 150000/100000 at {mount}/{NAME}" in facts.cpu_quota_source
    assert plan(Settings.model_validate({"workers": "auto"}), facts).workers == 1


@pytest.mark.timeout(30)
def test_v1_cfs_quota_and_memory_limit_are_read_from_inside_the_cgroup() -> None:
    """The same on a v1 (or hybrid) host, where cpu and memory live in v1 hierarchies."""
    _need_root()
    cpu_mount = next(
        (
            CGROUP / n
            for n in ("cpu,cpuacct", "cpu", "cpuacct,cpu")
            if (CGROUP / n / "cpu.cfs_quota_us").is_file()
        ),
        None,
    )
    if cpu_mount is None:
        pytest.skip("no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu (pure v2 host?)")
    memory_mount = CGROUP / "memory"
    has_memory = (memory_mount / "memory.limit_in_bytes").is_file()
    with contextlib.ExitStack() as stack:
        cpu_parent, cpu_inner = stack.enter_context(_nested(cpu_mount))
        procs = [cpu_inner / "cgroup.procs"]
        try:
            _write(cpu_parent / "cpu.cfs_period_us", "100000")
            _write(cpu_parent / "cpu.cfs_quota_us", "150000")
            cpu_inner.mkdir()
            if has_memory:
                mem_parent, mem_inner = stack.enter_context(_nested(memory_mount))
                _write(mem_parent / "memory.limit_in_bytes", str(512 * MIB))
                mem_inner.mkdir()
                procs.append(mem_inner / "cgroup.procs")
        except OSError as exc:
            pytest.skip(f"cannot set up cgroup v1 hierarchies: {exc}")
        facts = _run_child(*procs)
        cli_plan = _run_plan_cli(*procs)
    assert facts.cpu_quota == 1.5
    assert f"cpu.cfs_quota_us 150000/100000 at {cpu_mount}/{NAME}" in facts.cpu_quota_source
    # The real command, run inside the cgroups, reads and explains the quota.
    assert (cli_plan["workers"], cli_plan["limited_by"]) == (1, "cpu")
    (cpu_budget,) = [b for b in cli_plan["budgets"] if b["name"] == "cpu"]
    assert "cpu.cfs_quota_us 150000/100000" in cpu_budget["detail"]
    if has_memory:
        assert facts.memory_limit == 512 * MIB
        assert f"at {memory_mount}/{NAME}" in facts.memory_limit_source
    p = plan(Settings.model_validate({"workers": "auto", "worker_memory_estimate": 128}), facts)
    assert (p.workers, p.limited_by) == (1, "cpu")


@pytest.mark.timeout(90)
def test_reload_drains_first_when_the_memory_limit_has_no_room(supervisor) -> None:
    """Replacement first, unless a replacement beside the old worker would not fit the
    instance's memory limit: then each old worker drains first. Here the limit
    is real, so a surge would have driven the cgroup into its limit."""
    _need_root()
    memory = CGROUP / "memory"
    if not (memory / "memory.limit_in_bytes").is_file():
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    mport = free_port()
    with _nested(memory) as (parent, inner):
        try:
            _write(parent / "memory.limit_in_bytes", str(900 * MIB))
            inner.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot set up a cgroup v1 memory limit: {exc}")
        # master ~40 MiB + 2 workers x ~330 MiB fit in 900; a third worker would not.
        server = supervisor(
            "testapp:app", "--workers", "2", "--reload-surge", "1",
            "--metrics", "--metrics-port", str(mport),
            env={"TESTAPP_BALLAST_MB": "300"}, cgroups=(inner / "cgroup.procs",),
        )  # fmt: skip
        try:
            server.wait_ready(2, timeout=30)

            def sampled() -> int:  # the decision uses the master's RSS samples
                status = json.loads(get(mport, "/status")[1])
                return sum(w["rss_bytes"] > 250 * MIB for w in status["workers"])

            wait_until(lambda: sampled() == 2, 10, "RSS samples of both workers")
            before = server.worker_pids()
            most, least = 0, 2

            def reloaded() -> bool:
                nonlocal most, least
                most = max(most, len(server.worker_pids()))
                workers = json.loads(get(mport, "/status")[1])["workers"]
                serving = sum(w["state"] == "ready" and not w["stopping"] for w in workers)
                least = min(least, serving)
                return "reload complete" in server.log()

            server.signal(signal.SIGHUP)
            wait_until(reloaded, 40, server.log)
            log = server.log()
            assert log.count("draining it first") == 2, log
            assert most <= 2, f"{most} workers at once under a limit with room for 2"
            assert least == 1, "each slot drained only once the other one served"
            assert not server.serving_pids(2) & before
            assert (parent / "memory.failcnt").read_text().strip() == "0"  # never at the limit
        finally:
            server.stop()
