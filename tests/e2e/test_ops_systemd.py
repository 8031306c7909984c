"""The systemd units in deploy/: verified and scored by systemd-analyze, and the master
shown to serve, reload and drain under the seccomp filters the service unit asks for.

No systemd runs as PID 1 here (nor in CI), so nothing starts the units themselves:
`verify` and `security --offline=yes` (systemd >= 252) read the files, and the sandbox
filters are reproduced with libseccomp by tests/e2e/ops_sandbox.py.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import APPS, REPO, free_port, get, try_get, wait_until

pytestmark = pytest.mark.timeout(90)

DEPLOY = REPO / "deploy"
SERVICE, SOCKET = DEPLOY / "asgi-supervise.service", DEPLOY / "asgi-supervise.socket"
EXPOSURE_LIMIT = 3.0  # "OK" in systemd-analyze security's words
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd; .ci/run installs it)",
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )


def systemd_version() -> int:
    return int(re.match(r"systemd (\d+)", analyze("--version").stdout).group(1))


def installed_units(tmp_path: Path, *dropins: str) -> Path:
    """The units as an admin installs them: ExecStart points at a real asgi-supervise
    (verify checks that it is executable), nothing else changed; drop-ins beside them."""
    binary = Path(sys.executable).parent / "asgi-supervise"
    assert binary.exists(), binary
    text = SERVICE.read_text()
    assert "/opt/myapp/.venv/bin/asgi-supervise" in text
    (tmp_path / SERVICE.name).write_text(
        text.replace("/opt/myapp/.venv/bin/asgi-supervise", str(binary))
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    if dropins:
        folder = tmp_path / f"{SERVICE.name}.d"
        folder.mkdir()
        for name in dropins:
            shutil.copy(DEPLOY / "systemd" / name, folder / name)
    return tmp_path


@needs_analyze
def test_units_verify_clean(tmp_path):
    """`verify` exits 0 even on "Failed to parse service type": any output is a failure."""
    units = installed_units(tmp_path)
    result = analyze("verify", "--man=no", str(units / SOCKET.name), str(units / SERVICE.name))
    print(f"systemd {systemd_version()}: systemd-analyze verify: {result.stdout + result.stderr!r}")
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_privileged_port_dropin_verifies_clean(tmp_path):
    units = installed_units(tmp_path, "privileged-port.conf")
    result = analyze("verify", "--man=no", str(units / SERVICE.name))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_notify_reload_dropin_needs_systemd_253(tmp_path):
    units = installed_units(tmp_path, "notify-reload.conf")
    result = analyze("verify", "--man=no", str(units / SERVICE.name))
    output = result.stdout + result.stderr
    if systemd_version() >= 253:
        assert (result.returncode, output) == (0, "")
    else:  # why it is a drop-in and not the unit: 252 falls back to Type=simple
        assert "Failed to parse service type, ignoring: notify-reload" in output


def exposure(unit: Path) -> float:
    result = analyze("security", "--offline=yes", "--no-pager", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("dropins", [(), ("privileged-port.conf",)], ids=["unit", "port<1024"])
def test_security_exposure_is_ok(tmp_path, dropins):
    score = exposure(installed_units(tmp_path, *dropins) / SERVICE.name)
    print(f"systemd-analyze security --offline=yes {SERVICE.name} {dropins}: exposure {score}")
    assert score < EXPOSURE_LIMIT


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def syscall_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls(filters: list[str]) -> set[str]:
    """SystemCallFilter= as systemd reads it: an allow list first, `~` lines remove."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(member) for member in groups[item]))

    allowed: set[str] = expand("@default")  # always allowed with an allow list
    for line in filters:
        names = set().union(*(expand(item) for item in line.lstrip("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(
    ctypes.util.find_library("seccomp") is None,
    reason="libseccomp is not installed (Debian package libseccomp2, a systemd dependency)",
)
def test_master_serves_under_the_units_seccomp_filters(tmp_path):
    """uvloop and httptools (and CPython) under SystemCallFilter, MemoryDenyWriteExecute,
    RestrictAddressFamilies and NoNewPrivileges: boot, serve, scrape, reload, drain."""
    unit = unit_settings(SERVICE)
    # What ops_sandbox.py reproduces must be what the unit says.
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]
    allowed = tmp_path / "allowed-syscalls"
    allowed.write_text("\n".join(sorted(allowed_syscalls(unit["SystemCallFilter"]))))
    port, metrics = free_port(), free_port()
    log_path = tmp_path / "sandboxed.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    command = [
        sys.executable, str(Path(__file__).parent / "ops_sandbox.py"), str(allowed), "--",
        sys.executable, "-m", "asgi_supervise", "testapp:app", "--workers", "2",
        "--loop", "uvloop", "--http", "httptools", "--port", str(port),
        "--metrics", "--metrics-port", str(metrics),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=APPS, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def log() -> str:
        return log_path.read_text(errors="replace")

    try:
        wait_until(lambda: log().count(" ready in ") >= 2, 30, lambda: f"2 workers\n{log()}")
        assert get(port, "/")[0] == 200
        status, body = get(metrics, "/metrics")
        assert status == 200 and "asgi_supervise_workers" in body
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload complete" in log(), 30, lambda: f"reload\n{log()}")
        assert try_get(port, "/") is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert "Operation not permitted" not in log()
