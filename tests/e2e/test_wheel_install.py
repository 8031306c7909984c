"""The wheel ships the profiles and the CLI, and works installed outside the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from asgi_supervise import profiles
from conftest import REPO, c_compiler

# What `pip install .` needs from the checkout; copied so the build never writes into it.
SOURCES = ["pyproject.toml", "README.md", "supervisor", "profiles"]


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASGI_SUPERVISE_", "PYTHON"))}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.so")  # the editable build's
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path / "dist"
    attempts = [
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), "."],
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(out)],
        # Offline: build with the setuptools already installed (needs its bdist_wheel).
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
         str(out)],
    ]  # fmt: skip
    failures = []
    for cmd in attempts:
        result = _run(cmd, cwd=src, timeout=120)
        wheels = sorted(out.glob("asgi_supervise-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
        failures.append(f"$ {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    pytest.fail("could not build a wheel:\n" + "\n".join(failures))


@pytest.mark.timeout(300)
def test_wheel_ships_profiles_and_runs_installed(tmp_path: Path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for profile in profiles.names():
        assert f"asgi_supervise/profiles/{profile}.toml" in names
    for module in (
        "__init__",
        "__main__",
        "cli",
        "protocol",
        "config/settings",
        "config/sources",
        "sizing/budgets",
        "master/arbiter",
        "worker/__main__",
        "observe/metrics",
    ):
        assert f"asgi_supervise/{module}.py" in names
    assert "asgi_supervise/profiles/__init__.py" in names
    compiled = c_compiler() is not None
    extensions = {n for n in names if n.endswith(".so")}
    if compiled:  # the optional extension: built wherever it can be
        assert {n.split(".")[0] for n in extensions} == {"asgi_supervise/worker/_meter"}
    else:
        assert not extensions
    assert "asgi_supervise/worker/forwarded.py" in names  # proxy headers: Python only
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "asgi-supervise = asgi_supervise.launch:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )

    # A fresh venv with only the wheel installed in it; its dependencies are borrowed from
    # the test environment through a .pth line added *after* the install, so pip neither
    # downloads anything nor sees (and tries to replace) the editable install there.
    venv = tmp_path / "venv"
    result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, 60)
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    install += ["--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    result = _run(install, tmp_path, 120)
    assert result.returncode == 0, result.stdout + result.stderr
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   tmp_path, 30).stdout.strip()  # fmt: skip
    (Path(purelib) / "_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    outside = tmp_path / "elsewhere"  # no asgi-supervise.toml, no pyproject, not the repo
    outside.mkdir()
    where = _run([str(python), "-c", "import asgi_supervise; print(asgi_supervise.__file__)"],
                 outside, 30)  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), "not the installed copy"
    show = "from asgi_supervise.worker import meter; print(meter.Meter)"
    meter = _run([str(python), "-c", show], outside, 30)
    expected = "asgi_supervise.worker._meter.Meter" if compiled else "PythonMeter"
    assert expected in meter.stdout, meter.stdout + meter.stderr

    script = venv / "bin" / "asgi-supervise"
    result = _run([str(script), "config", "--profile", "container"], outside, 60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    host = next(line for line in result.stdout.splitlines() if line.startswith("host "))
    assert '"0.0.0.0"' in host
    assert host.endswith("# profile container")

    result = _run([str(script), "config", "--json", "--profile", "container"], outside, 60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["host"] == {"value": "0.0.0.0", "source": "profile container"}

    result = _run([str(script), "--version"], outside, 60)
    assert result.returncode == 0 and result.stdout.startswith("asgi-supervise "), result.stderr
