"""The metrics directory: the master deletes only what it made, and a full metrics
filesystem degrades the metrics, never the server. Pure parts: unit/test_multiproc_dir.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import APPS, Supervisor, free_port, get, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(90)

FOREIGN = {
    "app.db": b"SQLite format 3\0 the app's own database",
    "users.db": b"SQLite format 3\0 users",
    "notes.txt": b"keep me",
}
PREFIX = "asgi-supervise-metrics-"
DROPPED = "asgi_supervise_app_metric_samples_dropped_total"


def fill(directory: Path) -> None:
    directory.mkdir()
    for name, data in FOREIGN.items():
        (directory / name).write_bytes(data)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def private_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(mport: int) -> str:
    status, body = get(mport, "/metrics")
    assert status == 200, body
    return body


def kill_a_worker(server: Supervisor, want: int = 2) -> int:
    victim = min(server.worker_pids())
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in server.worker_pids() and len(server.worker_pids()) == want,
        15,
        lambda: f"worker {victim} replaced\n{server.log()}",
    )
    server.wait_ready(want + 1)
    return victim


def test_foreign_files_survive_start_serving_and_stop(supervisor, tmp_path: Path):
    given = tmp_path / "shared"
    fill(given)
    mport = free_port()
    server = supervisor(
        "countingapp:app", "--workers", "2", "--metrics", "--metrics-port", str(mport),
        "--multiproc-dir", str(given),
    )  # fmt: skip
    server.wait_ready(2)
    assert contents(given) == FOREIGN
    for _ in range(20):
        assert server.get("/pid")[0] == 200
    wait_until(lambda: value(scrape(mport), "app_handled_total") >= 20, 10, "app counts")
    assert contents(given) == FOREIGN
    (private,) = private_dirs(given)
    assert list(private.glob("counter_*.db")), "workers write into the private directory"

    kill_a_worker(server)  # its files are folded into the archive
    assert value(scrape(mport), "app_handled_total") >= 20
    assert contents(given) == FOREIGN

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert sorted(p.name for p in given.iterdir()) == sorted(FOREIGN)  # ours are gone
    assert contents(given) == FOREIGN


def test_masters_share_a_directory_and_a_killed_ones_leftovers_go(supervisor, tmp_path: Path):
    given = tmp_path / "shared"
    fill(given)

    def start() -> tuple[Supervisor, int]:
        mport = free_port()
        server = supervisor(
            "countingapp:app", "--metrics", "--metrics-port", str(mport),
            "--multiproc-dir", str(given),
        )  # fmt: skip
        server.wait_ready(1)
        return server, mport

    first, _ = start()
    second, second_mport = start()
    for _ in range(5):
        second.get("/pid")
    assert len(private_dirs(given)) == 2
    wait_until(lambda: value(scrape(second_mport), "app_handled_total") >= 5, 10, "counts")

    first_workers = first.worker_pids()
    first.process.kill()  # no cleanup: its private directory stays behind
    first.wait_exit()
    wait_until(lambda: not any(psutil.pid_exists(p) for p in first_workers), 5, "workers gone")
    assert len(private_dirs(given)) == 2

    third, _ = start()  # removes the leftovers of the first, not the second's
    left = private_dirs(given)
    assert len(left) == 2 and not any(p.name.startswith(f"{PREFIX}{first.pid}-") for p in left)
    assert value(scrape(second_mport), "app_handled_total") >= 5
    assert contents(given) == FOREIGN

    for server in (second, third):
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    assert sorted(p.name for p in given.iterdir()) == sorted(FOREIGN)


def test_a_multiproc_dir_that_is_a_file_is_a_one_line_usage_error(tmp_path: Path):
    target = tmp_path / "app.db"
    target.write_bytes(FOREIGN["app.db"])
    result = run_cli(
        "testapp:app", "--port", str(free_port()), "--metrics", "--metrics-port",
        str(free_port()), "--multiproc-dir", str(target),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"asgi-supervise: --multiproc-dir {target}: cannot hold the workers' metrics "
        "directory: not a directory"
    ]
    assert target.read_bytes() == FOREIGN["app.db"]


# --- a full metrics filesystem ---------------------------------------------------------------


def _cannot_mount(tmp_path: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here, or None."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(probe)],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return None if result.returncode == 0 else result.stderr.strip() or "mount failed"


MOUNT = "{mount}"  # in a test's arguments: the tmpfs


class OnSmallTmpfs(Supervisor):
    """A master in a mount namespace of its own, with a tmpfs of `size` at `mount`.

    unshare and sh exec into the master, so its pid is the process's; workers share the
    namespace; the mount goes with the last of them. The tests' own view never has it.
    """

    def __init__(self, tmp_path: Path, args: list[str], mount: Path, size: str, env: dict):
        self.port = free_port()
        self.log_path = tmp_path / f"supervisor-{self.port}.log"
        self.args = args
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        run_env.update(PYTHONUNBUFFERED="1", **env)
        command = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"',
            "sh", size, str(mount),
            sys.executable, "-m", "asgi_supervise", *args, "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=APPS, env=run_env
            )
        self.ps = psutil.Process(self.process.pid)


@pytest.fixture
def on_small_tmpfs(tmp_path: Path):
    why = _cannot_mount(tmp_path)
    if why is not None:
        pytest.skip(f"needs a tmpfs mounted in a private mount namespace (root): {why}")
    started: list[Supervisor] = []

    def start(*args: str, size: str) -> Supervisor:
        mount = tmp_path / f"metricsfs-{len(started)}"
        mount.mkdir()
        env = {"PROMROUTES_FILL_DIR": str(mount)}
        argv = [str(mount) if arg == MOUNT else arg for arg in args]
        server = OnSmallTmpfs(tmp_path, argv, mount, size, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize("size", ["64k", "256k"])
def test_master_and_workers_survive_a_full_metrics_filesystem(on_small_tmpfs, size: str):
    """Before: the workers' and the master's writes through prometheus_client's memory maps
    hit pages the full tmpfs could not back: SIGBUS, the master (exit -7) and every worker
    with it. Now the metrics degrade, counted, and the server does not notice."""
    mport = free_port()
    server = on_small_tmpfs(
        "promroutes:app", "--workers", "2", "--metrics", "--metrics-port", str(mport),
        "--multiproc-dir", MOUNT, size=size,
    )  # fmt: skip
    server.wait_ready(2)
    statuses = [(try_get(server.port, f"/r/{i}") or (0,))[0] for i in range(400)]
    assert statuses == [200] * 400, server.log()
    assert server.get("/fill") == (200, "full")  # whatever room was left is gone now
    for i in range(400, 450):  # new series on a full disk
        assert server.get(f"/r/{i}")[0] == 200
    before = value(scrape(mport), "app_route_hits_total")

    victim = kill_a_worker(server)  # the master folds its files: no room for the archive

    assert server.process.poll() is None, server.log()
    served = {int(server.get("/pid")[1]) for _ in range(20)}
    assert served and victim not in served
    assert set(server.worker_pids()) >= served
    for i in range(450, 500):
        assert server.get(f"/r/{i}")[0] == 200
    assert get(mport, "/readyz")[0] == 200
    wait_until(lambda: value(scrape(mport), DROPPED) > 0, 10, "dropped samples counted")
    assert value(scrape(mport), "app_route_hits_total") >= before  # nothing went backwards
    log = server.log()
    if size == "256k":  # some series had room before it filled up: they still show
        assert before > 0
        assert "cannot archive" in log  # the master met the full disk folding the victim
    assert "app metrics: no room for" in log
    assert "SIGBUS" not in log and "Traceback" not in log, log

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0, server.log()
