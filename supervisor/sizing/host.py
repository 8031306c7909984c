"""What this machine lets the process use: CPU quota, cpuset, affinity, memory limit.

``os.cpu_count()`` reports the host's cores inside a CPU-limited container. This module
reads the cgroup limits instead (v1, v2 and hybrid hosts) into `HostFacts`, which
`sizing` turns into a plan. `read_host` takes a ``root`` so tests can point it at a fake
tree, and never raises: a limit it cannot read is no limit, with a note saying so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from asgi_supervise.sizing.facts import Found, HostFacts

UNLIMITED = 2**62  # v1 reports "no memory limit" as a huge page-aligned number
CGROUP_FS = Path("sys/fs/cgroup")


def _read(path: Path) -> str | None:
    """File text, or None when missing or unreadable: a limit we cannot read is no limit."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _show(root: Path, path: Path) -> str:
    """The path as the process would see it, so fake trees print like real ones."""
    return "/" + path.relative_to(root).as_posix().removeprefix(".")


def parse_cpu_list(text: str) -> int | None:
    """Count CPUs in a kernel cpu list such as ``0-3,5`` (5); None when empty."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        first, last = int(low), int(high if dash else low)
        if first < 0 or last < first:
            raise ValueError(f"bad cpu range {part!r}")
        cpus.update(range(first, last + 1))
    return len(cpus) or None


def parse_proc_cgroup(text: str) -> tuple[str, dict[str, str]]:
    """The v2 path and the v1 controller paths from ``/proc/self/cgroup``.

    Missing entries default to ``/``: with a cgroup namespace the mount root *is* our cgroup.
    """
    v2, v1 = "/", {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2 = path
        for name in controllers.split(","):
            v1[name] = path
    return v2, v1


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """Our cgroup directory and every ancestor up to the mount, innermost first.

    A parent may hold a tighter limit than the leaf, so limits are read at every level.
    When the path is not visible under the mount (namespaced ``0::/``, ``/../..``, or a
    v1 container whose mount root is its own cgroup) the mount root is our cgroup.
    """
    parts = [p for p in path.split("/") if p]
    leaf = mount.joinpath(*parts)
    if ".." in parts or not leaf.is_dir():
        return [mount] if mount.is_dir() else []
    dirs = [leaf]
    while dirs[-1] != mount:
        dirs.append(dirs[-1].parent)
    return dirs


Reader = Callable[[Path], Found | None]


def _in(name: str, parse: Callable[[str], Found | None]) -> Reader:
    """Parse one file of a cgroup directory; the hit is labelled with the file's name."""

    def read(d: Path) -> Found | None:
        text = _read(d / name)
        hit = None if text is None else parse(text)
        return None if hit is None else (hit[0], f"{name} {hit[1]}".rstrip())

    return read


def _cpu_max(text: str) -> Found | None:
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    q, p = int(quota), int(period or 100000)
    if q <= 0 or p <= 0:
        raise ValueError(f"cpu.max {text!r}")
    return q / p, f"{q}/{p}"


def _v1_cpu(d: Path) -> Found | None:
    text = _read(d / "cpu.cfs_quota_us")
    if text is None or int(text) < 0:  # -1 = no quota
        return None
    q, p = int(text), int(_read(d / "cpu.cfs_period_us") or 100000)
    if q == 0 or p <= 0:
        raise ValueError(f"cpu.cfs_quota_us {q}, cpu.cfs_period_us {p}")
    return q / p, f"cpu.cfs_quota_us {q}/{p}"


def _cpus(text: str) -> Found | None:
    count = parse_cpu_list(text)
    return None if count is None else (count, text)


def _bytes(text: str) -> Found | None:
    if text == "max":
        return None
    value = int(text)
    if value <= 0:
        raise ValueError(f"memory limit {text!r}")
    return (value, "") if value < UNLIMITED else None


def _v1_cpuset(d: Path) -> Found | None:
    return _in("cpuset.effective_cpus", _cpus)(d) or _in("cpuset.cpus", _cpus)(d)


# limit -> (v2 reader, v1 mount directory names, v1 reader)
LIMITS: dict[str, tuple[Reader, tuple[str, ...], Reader]] = {
    "cpu": (_in("cpu.max", _cpu_max), ("cpu,cpuacct", "cpu", "cpuacct,cpu"), _v1_cpu),
    "cpuset": (_in("cpuset.cpus.effective", _cpus), ("cpuset",), _v1_cpuset),
    "memory": (_in("memory.max", _bytes), ("memory",), _in("memory.limit_in_bytes", _bytes)),
}


def _walk(root: Path, dirs: list[Path], read: Reader, label: str, notes: list[str]) -> list[Found]:
    """Every limit found from our cgroup up to the root; malformed files are skipped."""
    found = []
    for d in dirs:
        try:
            hit = read(d)
        except ValueError as exc:
            notes.append(f"ignored malformed {label} file in {_show(root, d)}: {exc}")
            continue
        if hit is not None:
            found.append((hit[0], f"{label} {hit[1]} at {_show(root, d)}"))
    return found


def _limits(root: Path, notes: list[str]) -> dict[str, list[Found]]:
    """All CPU quotas, cpusets and memory limits on our cgroup paths, v2 and v1 alike.

    Hybrid hosts mount both; whichever hierarchy holds a controller has its files.
    """
    v2_path, v1_paths = parse_proc_cgroup(_read(root / "proc/self/cgroup") or "")
    base = root / CGROUP_FS
    v2 = next((m for m in (base, base / "unified") if (m / "cgroup.controllers").is_file()), None)
    found: dict[str, list[Found]] = {}
    for kind, (v2_read, v1_names, v1_read) in LIMITS.items():
        hits = []
        if v2 is not None:
            hits = _walk(root, _cgroup_dirs(v2, v2_path), v2_read, "cgroup v2", notes)
        v1 = next((base / n for n in v1_names if (base / n).is_dir()), None)
        if v1 is not None:
            dirs = _cgroup_dirs(v1, v1_paths.get(kind, "/"))
            hits += _walk(root, dirs, v1_read, "cgroup v1", notes)
        found[kind] = hits
    return found


def _host_memory(root: Path) -> int:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                break
    if root == Path("/"):
        import psutil

        return int(psutil.virtual_memory().total)
    return 0


def _host_cpus(root: Path) -> int:
    if root != Path("/"):
        try:
            return parse_cpu_list(_read(root / "sys/devices/system/cpu/online") or "") or 1
        except ValueError:
            return 1
    return os.cpu_count() or 1


def read_host(root: Path = Path("/"), affinity: int | None = None) -> HostFacts:
    """Read cgroup CPU quota, cpuset and memory limit, affinity and host size. Never raises."""
    notes: list[str] = []
    found = _limits(root, notes)
    memory = found["memory"]
    host_memory = _host_memory(root)
    if host_memory:  # a "limit" at or above the machine's memory limits nothing
        memory = [m for m in memory if m[0] < host_memory]
    if affinity is None and root == Path("/") and hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
    quota, quota_src = min(found["cpu"], default=(None, "none"))
    cpus, cpus_src = min(found["cpuset"], default=(None, "none"))
    mem, mem_src = min(memory, default=(None, "none"))
    return HostFacts(
        cpu_quota=quota,
        cpu_quota_source=quota_src,
        cpuset_cpus=None if cpus is None else int(cpus),
        cpuset_source=cpus_src,
        affinity_cpus=affinity,
        host_cpus=_host_cpus(root),
        memory_limit=None if mem is None else int(mem),
        memory_limit_source=mem_src,
        host_memory=host_memory,
        notes=tuple(notes),
    )
