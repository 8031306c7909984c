"""The master's metrics directory: it deletes only what it made, and a full disk is an
OSError it survives. Real files; the full-disk end to end: e2e/test_metrics_dir.py."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from pathlib import Path

import pytest
from prometheus_client import Counter, values
from prometheus_client.mmap_dict import MmapedDict

from asgi_supervise.observe.metrics import SupervisorMetrics, render
from asgi_supervise.observe.multiproc import (
    MARKER,
    PREFIX,
    MultiprocDir,
    MultiprocDirError,
    Owner,
    encode,
    here,
    is_stale,
)

FOREIGN = {"app.db": b"SQLite format 3\0app", "users.db": b"SQLite format 3\0users"}
FOREIGN |= {"counter_1.db": b"someone else's", "notes.txt": b"keep"}


def fill(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_a_given_directory_keeps_all_it_held_and_gets_a_private_one(tmp_path: Path) -> None:
    given = tmp_path / "shared"
    fill(given, FOREIGN)
    directory = MultiprocDir.create(str(given))

    assert contents(given) == FOREIGN
    (private,) = [p for p in given.iterdir() if p.is_dir()]
    assert private.name.startswith(f"{PREFIX}{os.getpid()}-")
    assert directory.path == str(private)
    assert directory.environ() == {"PROMETHEUS_MULTIPROC_DIR": str(private)}
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    owner = Owner.from_json((private / MARKER).read_text())
    assert owner is not None and owner.pid == os.getpid() and owner.where == here()
    (private / "counter_99.db").write_bytes(b"ours")

    directory.cleanup()
    assert sorted(p.name for p in given.iterdir()) == sorted(FOREIGN)
    assert contents(given) == FOREIGN


def test_the_default_is_a_private_temp_directory() -> None:
    made = MultiprocDir.create(None)
    assert os.path.dirname(made.path) == tempfile.gettempdir()
    assert os.path.basename(made.path).startswith(PREFIX)
    assert stat.S_IMODE(os.stat(made.path).st_mode) == 0o700
    made.cleanup()
    assert not os.path.exists(made.path)


def test_a_directory_it_had_to_make_goes_only_if_empty(tmp_path: Path) -> None:
    fresh = MultiprocDir.create(str(tmp_path / "new" / "dir"))
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "dir").st_mode) == 0o700
    fresh.cleanup()
    assert not (tmp_path / "new" / "dir").exists()
    assert (tmp_path / "new").is_dir()  # existed by then: not made for the directory

    shared = MultiprocDir.create(str(tmp_path / "later"))
    (tmp_path / "later" / "app.db").write_bytes(b"written meanwhile")
    shared.cleanup()
    assert contents(tmp_path / "later") == {"app.db": b"written meanwhile"}


def test_an_unusable_path_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(MultiprocDirError) as info:
            MultiprocDir.create(str(path))
        message = str(info.value)
        assert isinstance(info.value, OSError)  # the master's usage-error path: exit 2
        assert message.startswith(f"--multiproc-dir {path}: ")
        assert message.endswith("not a directory") and "\n" not in message
    assert (tmp_path / "file").read_text() == "not a directory"


WHERE = "boot 1a8c215b"


@pytest.mark.parametrize(
    ("owner", "locked", "stale"),
    [
        (Owner(10, WHERE), False, True),  # no one holds its lock: its master is gone
        (Owner(10, WHERE), True, False),  # its master lives
        (Owner(10, "boot 77"), False, False),  # another kernel's lock: says nothing here
        (None, False, False),  # no marker, or not ours: not provably a master's
    ],
)
def test_is_stale(owner: Owner | None, locked: bool, stale: bool) -> None:
    assert is_stale(owner, WHERE, locked) is stale


def test_markers_are_read_strictly() -> None:
    owner = Owner(42, WHERE)
    assert Owner.from_json(owner.to_json()) == owner
    for text in ("", "{}", "[1]", '{"pid": "x", "where": "h"}', "null", '{"pid": 1}'):
        assert Owner.from_json(text) is None
    assert Owner.from_json('{"pid": 0, "where": "h"}') is None


def test_only_provably_dead_masters_directories_are_removed(tmp_path: Path) -> None:
    given = tmp_path / "shared"
    fill(given, FOREIGN)
    me = Owner.this_process()
    held: list[int] = []

    def private(name: str, owner: Owner | None, parent: Path = given, lock=False) -> Path:
        path = parent / name
        path.mkdir()
        (path / "counter_7.db").write_bytes(b"x")
        if owner is not None:
            (path / MARKER).write_text(owner.to_json())
        if lock:  # as a live master does, for its whole life
            fd = os.open(path / MARKER, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)
        return path

    dead = private(f"{PREFIX}1-a", me)  # same pid even: the lock decides, not the pid
    alive = private(f"{PREFIX}2-b", Owner(12345, me.where), lock=True)
    elsewhere = private(f"{PREFIX}3-c", Owner(me.pid, "boot another-kernel"))
    unmarked = private(f"{PREFIX}4-d", None)
    not_ours = private("backup", me)
    target = private(f"{PREFIX}5-e", me, tmp_path)
    (given / f"{PREFIX}6-link").symlink_to(target)

    try:
        directory = MultiprocDir.create(str(given))
    finally:
        for fd in held:
            os.close(fd)
    assert not dead.exists()
    for kept in (alive, elsewhere, unmarked, not_ours, target, given / f"{PREFIX}6-link"):
        assert (kept / "counter_7.db").exists(), kept
    assert contents(given) == FOREIGN

    again = MultiprocDir.create(str(given))  # a live master's own directory is locked
    assert os.path.isdir(directory.path)
    assert not alive.exists()  # its "master" let go of the lock above
    again.cleanup()
    directory.cleanup()


def test_encode_is_prometheus_clients_file_layout(tmp_path: Path) -> None:
    data = {"a": 1.5, "ключ-with-a-longer-name": 2.0, "": -3.25}
    path = tmp_path / "counter_archived.db"
    path.write_bytes(encode(data))
    got = {k: v for k, v, _, _ in MmapedDict.read_all_values_from_file(str(path))}
    assert got == data
    assert encode({}) == b"\x08\0\0\0\0\0\0\0"


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made = MultiprocDir.create(str(tmp_path / "multiproc"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", made.path)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # restored afterwards
    yield made
    values.close_all_multiprocess_files()
    made.cleanup()


def count_as(pid: int, requests: int) -> None:
    values.ValueClass = values.MultiProcessValue(lambda: pid)
    Counter("app_requests", "Requests.", ["path"], registry=None).labels("/").inc(requests)


def total(directory: MultiprocDir) -> float | None:
    return directory.collect_registry().get_sample_value("app_requests_total", {"path": "/"})


def test_no_room_for_the_archive_keeps_the_dead_workers_file(directory: MultiprocDir) -> None:
    """A write that fails (a directory in the way here; ENOSPC on a full disk) is survived:
    the dead worker's file stays, still counted, and is archived once there is room."""
    count_as(701, requests=3)
    directory.worker_exited(701)
    count_as(702, requests=4)
    blocker = Path(directory.path, "counter_archived.db.new")
    blocker.mkdir()  # the archive cannot be written

    directory.worker_exited(702)
    assert Path(directory.path, "counter_702.db").exists()
    assert total(directory) == 7
    count_as(703, requests=5)
    directory.worker_exited(703)  # still no room: logged once, both files stay
    assert total(directory) == 12

    blocker.rmdir()
    count_as(704, requests=1)
    directory.worker_exited(704)  # room again: the kept files are archived too
    assert [n for n in os.listdir(directory.path) if n.startswith("counter_")] == [
        "counter_archived.db"
    ]
    assert total(directory) == 13


def test_a_kept_file_whose_pid_returns_is_left_to_its_new_worker(
    directory: MultiprocDir,
) -> None:
    count_as(801, requests=2)
    blocker = Path(directory.path, "counter_archived.db.new")
    blocker.mkdir()
    directory.worker_exited(801)
    blocker.rmdir()
    directory.worker_started(801)  # the kernel gave the pid to a new worker: it writes on
    count_as(802, requests=1)
    directory.worker_exited(802)
    assert Path(directory.path, "counter_801.db").exists()
    assert total(directory) == 3


def test_dropped_app_samples_add_up_and_nonsense_is_refused() -> None:
    supervisor = SupervisorMetrics()
    supervisor.app_samples_dropped(3)
    supervisor.app_samples_dropped(0)
    supervisor.app_samples_dropped(4)
    for bad in (-1, "5", 1.5, True, None):
        with pytest.raises(ValueError):
            supervisor.app_samples_dropped(bad)
    body, _ = render(None, None, supervisor)
    assert b"\nasgi_supervise_app_metric_samples_dropped_total 7.0\n" in body
