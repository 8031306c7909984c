"""The workers' prometheus_client multiprocess directory, owned and compacted by the master.

Ownership. The master writes only inside a private directory it makes itself,
``asgi-supervise-metrics-<pid>-<random>``, and deletes only that, at exit. With
``--multiproc-dir DIR`` that private directory goes *inside* DIR; without it, inside the
system temp directory. DIR may be shared with anything (an app's SQLite ``app.db``, another
master's directory): nothing of it is ever deleted, only a DIR the master had to create
itself, and only if it is empty again at exit. Workers get the private directory as
``PROMETHEUS_MULTIPROC_DIR``.

Why a subdirectory rather than refusing a non-empty DIR, or wiping its ``*.db``: the
files prometheus_client writes (``counter_123.db``) cannot be told apart from anyone
else's by name, so wiping cannot be made safe, and refusing would break restarts after a
crash and two masters sharing one volume. A directory the master made, with a marker
inside, is provably its own.

A master killed with SIGKILL cannot remove its directory. The next master on the same DIR
removes such leftovers when their marker proves the owner gone. The marker
(``owner.json``: pid and the kernel's boot id) is held under an exclusive flock() for the
master's whole life, and the kernel drops that lock when the master dies, however it
dies: a marker whose lock can be taken belongs to a dead master. Unlike a pid, the lock
means the same across pid namespaces, so a container restarted on the same volume (a new
namespace, where the old pid means nothing) still cleans up after its predecessor. A
marker from another kernel (another machine on a network volume, or before a reboot)
proves nothing: its lock is not this kernel's, so that directory is left alone.

A full filesystem. prometheus_client writes through shared memory maps of sparse files,
and a page that a full disk cannot back kills the writer with SIGBUS. The master never
writes a mapped page: it reads files with read() and writes its archives with write() to
a new file that replaces the old one, so a full disk is an OSError it logs once, and the
dead worker's file then stays as it is (its totals still show) until there is room.
Workers are protected by ``asgi_supervise.worker.promfiles``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("asgi_supervise.master")

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is first imported
ARCHIVED_TYPES = ("counter", "histogram", "summary")  # what compaction folds; never gauges
PREFIX = "asgi-supervise-metrics-"  # of every private directory, in DIR or in /tmp
MARKER = "owner.json"  # in the private directory: not *.db, so never read as metrics
_UNREADABLE = (RuntimeError, struct.error, UnicodeDecodeError, ValueError)


class MultiprocDirError(OSError):
    """The directory cannot be used: printed as one line, exit code 2 (an OSError, so the
    master treats it like a taken metrics port)."""


@dataclass(frozen=True)
class Owner:
    """Who made a private directory: written into its marker, for the staleness rule."""

    pid: int  # for people reading the marker and the log
    where: str  # the kernel whose locks the marker's lock is: see here()

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), here())

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        """None for anything that is not a marker we wrote."""
        try:
            data = json.loads(text)
            owner = cls(int(data["pid"]), str(data["where"]))
        except (ValueError, TypeError, KeyError):
            return None
        return owner if owner.pid > 0 and owner.where else None


def here() -> str:
    """The running kernel, by its boot id: the one whose flock() locks a marker's lock is.

    Containers on one host share it; another machine on a network volume, or this one
    after a reboot, has another.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return "boot " + fh.read().strip()
    except OSError:
        return "host " + socket.gethostname()


def is_stale(owner: Owner | None, where: str, locked: bool) -> bool:
    """Whether a private directory's master is provably gone, so its directory may go.

    `locked`: someone holds the marker's lock (its master lives, as it holds it for its
    whole life). No marker, or a marker from another kernel, proves nothing.
    """
    return owner is not None and owner.where == where and not locked


def _lock(fd: int) -> bool:
    """Take the exclusive lock on an open marker without waiting: False if it is held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class MultiprocDir:
    """The workers' prometheus_client directory, owned and compacted by the master.

    prometheus_client keeps every dead pid's counter and histogram files forever, so with
    recycling the directory grows and scrapes slow to seconds (client_python#204, #367).
    The master reaps each worker itself, so right then it folds the dead pid's files into
    one archive file per type. That is safe here, unlike in general, because the pid is
    known dead and cannot come back before the master spawns again.
    """

    def __init__(self, path: str, parent: str | None = None) -> None:
        self.path = path  # the private directory, ours alone
        self.parent = parent  # a DIR this master created, removed at exit if empty
        self.lock = threading.Lock()  # compaction never overlaps a scrape
        self.unarchived: set[int] = set()  # dead pids whose files stay: no room to fold
        self.full_logged = False
        self.marker: int | None = None  # the marker's fd, holding its lock while we live

    @classmethod
    def create(cls, path: str | None = None) -> MultiprocDir:
        """A new private directory in `path` (default: the temp directory); see the module.

        Raises MultiprocDirError when `path` cannot hold one (not a directory, no access).
        """
        parent, made = tempfile.gettempdir(), None
        if path is not None:
            parent = os.path.abspath(path)
            try:
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=0o700)
                    made = parent
            except OSError as exc:
                raise _unusable(path, exc) from None
        _remove_stale(parent)
        owner = Owner.this_process()
        try:  # mkdtemp: mode 0700, a name no one else has
            private = tempfile.mkdtemp(prefix=f"{PREFIX}{owner.pid}-", dir=parent)
        except OSError as exc:
            raise _unusable(path, exc, parent) from None
        directory = cls(private, made)
        try:
            fd = os.open(os.path.join(private, MARKER), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            directory.marker = fd  # open (not inherited: O_CLOEXEC) until cleanup()
            with contextlib.suppress(OSError):  # no locks here (ENOLCK): no one else's either
                _lock(fd)
            os.write(fd, owner.to_json().encode())
        except OSError as exc:
            directory.cleanup()
            raise _unusable(path, exc, parent) from None
        return directory

    def environ(self) -> dict[str, str]:
        """What a worker's environment needs, so its prometheus_client writes files here."""
        return {ENV_VAR: self.path}

    def files(self, pattern: str = "*.db") -> list[str]:
        return glob.glob(os.path.join(glob.escape(self.path), pattern))

    def worker_started(self, pid: int) -> None:
        """A new worker with a kept file's pid writes on in it: not ours to fold now."""
        self.unarchived.discard(pid)

    def worker_exited(self, pid: int) -> None:
        """Fold a reaped worker's files. Call before the next spawn: pids get reused.

        Its gauges go in every multiprocess mode, not only the ``live*`` ones
        prometheus_client removes: a dead process has no current reading. Files an
        earlier fold had no room for are tried again.
        """
        with self.lock:
            mark_process_dead(pid, self.path)
            for dead in sorted({pid, *self.unarchived}):
                self.unarchived.discard(dead)
                for kind in ARCHIVED_TYPES:
                    source = os.path.join(self.path, f"{kind}_{dead}.db")
                    if not self._fold(source, kind):
                        self.unarchived.add(dead)
            for name in self.files(f"gauge_*_{pid}.db"):
                _remove(name)

    def _fold(self, source: str, kind: str) -> bool:
        """Add one dead pid's values into ``<kind>_archived.db``, then delete its file.

        Bucket files hold per-bucket (not cumulative) counts, so plain addition is right
        for counters, histograms and summaries alike. False when the archive could not be
        written (a full disk): the file then stays, and its values still show.
        """
        try:
            values = [(key, value) for key, value, _, _ in _read(source)]
        except FileNotFoundError:
            return True
        except _UNREADABLE as exc:  # killed mid-write: keep the scrape working
            log.warning("dropping unreadable metrics file %s: %s", source, exc)
            values = []
        if values:
            archive = os.path.join(self.path, f"{kind}_archived.db")
            try:
                totals = _archived(archive)
                for key, value in values:
                    totals[key] = totals.get(key, 0.0) + value
                _replace(archive, encode(totals))
            except OSError as exc:
                self._cannot_archive(source, exc)
                return False
        _remove(source)
        return True

    def _cannot_archive(self, source: str, exc: OSError) -> None:
        if not self.full_logged:
            self.full_logged = True
            log.warning(
                "metrics directory %s: cannot archive %s (%s): dead workers' files stay "
                "as they are, their totals still served, until there is room",
                self.path,
                os.path.basename(source),
                exc.strerror or exc,
                extra={"event": "metrics_dir_full"},
            )

    def collect_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        _DirectoryCollector(self, registry)
        return registry

    def cleanup(self) -> None:
        """Remove the private directory, and a DIR this master created if it is empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.marker is not None:  # the lock goes only once the directory has
            os.close(self.marker)
            self.marker = None
        if self.parent is not None:
            with contextlib.suppress(OSError):  # not empty: someone else's files are there
                os.rmdir(self.parent)


def _unusable(path: str | None, exc: OSError, parent: str = "") -> MultiprocDirError:
    if isinstance(exc, FileExistsError | NotADirectoryError):
        reason = "not a directory"
    else:
        reason = exc.strerror or str(exc)
    if path is None:  # the default: say what to set instead
        where = f"the temp directory {parent} (set --multiproc-dir)"
    else:
        where = f"--multiproc-dir {path}"
    return MultiprocDirError(f"{where}: cannot hold the workers' metrics directory: {reason}")


def _remove_stale(parent: str) -> None:
    """Remove private directories in `parent` whose master is provably gone."""
    where = here()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue  # not one this user could have made
            fd = os.open(os.path.join(entry.path, MARKER), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:  # read, then lock: a master still writing its marker holds the lock already
            owner = Owner.from_json(os.read(fd, 4096).decode(errors="replace"))
            if is_stale(owner, where, locked=not _lock(fd)):
                assert owner is not None
                shutil.rmtree(entry.path, ignore_errors=True)  # under the lock: one remover
                log.info("removed %s: its master (pid %d) is gone", entry.path, owner.pid)
        except OSError:  # no locks on this filesystem (ENOLCK): nothing is provable
            pass
        finally:
            os.close(fd)


class _DirectoryCollector(MultiProcessCollector):
    """prometheus_client's collector, holding our lock and skipping unreadable files.

    A file caught between creation and its first write is empty, and stock
    prometheus_client then fails the whole scrape with ``struct.error``; a worker may
    also remove its own empty file when it finds no room (``worker.promfiles``).
    """

    def __init__(self, directory: MultiprocDir, registry: CollectorRegistry) -> None:
        self.directory = directory
        super().__init__(registry, directory.path)

    def collect(self) -> Iterable[Metric]:
        with self.directory.lock:
            files = self.directory.files()
            try:
                return list(self.merge(files))
            except (OSError, *_UNREADABLE):
                return list(self.merge([name for name in files if _readable(name)]))


def encode(values: Mapping[str, float]) -> bytes:
    """Values in prometheus_client's file layout (``mmap_dict.MmapedDict``), as bytes.

    A 4-byte used length and 4 bytes of padding, then per key: its 4-byte length, the
    UTF-8 key padded with spaces to 8-byte alignment, the value and a timestamp (0).
    """
    entries = []
    for key, value in values.items():
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entries.append(struct.pack(f"i{len(padded)}sdd", len(encoded), padded, value, 0.0))
    body = b"".join(entries)
    return struct.pack("ii", 8 + len(body), 0) + body


def _archived(path: str) -> dict[str, float]:
    try:
        return {key: value for key, value, _, _ in _read(path)}
    except FileNotFoundError:
        return {}
    except _UNREADABLE as exc:
        log.warning("dropping unreadable metrics archive %s: %s", path, exc)
        return {}


def _replace(path: str, data: bytes) -> None:
    """Write `path` anew with write(), never a memory map: a full disk raises OSError."""
    new = path + ".new"  # not *.db: a scrape never reads it half-written
    try:
        with open(new, "wb") as fh:
            fh.write(data)
        os.replace(new, path)
    except OSError:
        _remove(new)
        raise


def _read(path: str) -> Iterable[tuple[str, float, float, int]]:
    return MmapedDict.read_all_values_from_file(path)


def _readable(path: str) -> bool:
    try:
        list(_read(path))
    except (OSError, *_UNREADABLE):
        return False
    return True


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
