"""The workers' prometheus_client multiprocess directory, owned and compacted by the master."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("asgi_supervise.master")

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is first imported
ARCHIVED_TYPES = ("counter", "histogram", "summary")  # what compaction folds; never gauges
_UNREADABLE = (RuntimeError, struct.error, UnicodeDecodeError, ValueError)


class MultiprocDir:
    """The workers' prometheus_client directory, owned and compacted by the master.

    prometheus_client keeps every dead pid's counter and histogram files forever, so with
    recycling the directory grows and scrapes slow to seconds (client_python#204, #367).
    The master reaps each worker itself, so right then it folds the dead pid's files into
    one archive file per type. That is safe here, unlike in general, because the pid is
    known dead and cannot come back before the master spawns again.
    """

    def __init__(self, path: str, owned: bool) -> None:
        self.path = path
        self.owned = owned  # we made it, so we remove it
        self.lock = threading.Lock()  # compaction never overlaps a scrape

    @classmethod
    def create(cls, path: str | None = None) -> MultiprocDir:
        """A private directory, wiped: stale files from a previous run would add up."""
        if path is None:  # mkdtemp: mode 0700, and /tmp is writable on read-only images
            return cls(tempfile.mkdtemp(prefix="asgi-supervise-metrics-"), owned=True)
        path = os.path.abspath(path)
        owned = not os.path.isdir(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        directory = cls(path, owned)
        directory.wipe()
        return directory

    def environ(self) -> dict[str, str]:
        """What a worker's environment needs, so its prometheus_client writes files here."""
        return {ENV_VAR: self.path}

    def files(self, pattern: str = "*.db") -> list[str]:
        return glob.glob(os.path.join(glob.escape(self.path), pattern))

    def wipe(self) -> None:
        with self.lock:
            for name in self.files():
                _remove(name)

    def worker_exited(self, pid: int) -> None:
        """Fold a reaped worker's files. Call before the next spawn: pids get reused.

        Its gauges go in every multiprocess mode, not only the ``live*`` ones
        prometheus_client removes: a dead process has no current reading.
        """
        with self.lock:
            mark_process_dead(pid, self.path)
            for kind in ARCHIVED_TYPES:
                self._fold(os.path.join(self.path, f"{kind}_{pid}.db"), kind)
            for name in self.files(f"gauge_*_{pid}.db"):
                _remove(name)

    def _fold(self, source: str, kind: str) -> None:
        """Add one dead pid's values into ``<kind>_archived.db``, then delete its file.

        Bucket files hold per-bucket (not cumulative) counts, so plain addition is right
        for counters, histograms and summaries alike.
        """
        try:
            values = [(key, value) for key, value, _, _ in _read(source)]
        except FileNotFoundError:
            return
        except _UNREADABLE as exc:  # killed mid-write: keep the scrape working
            log.warning("dropping unreadable metrics file %s: %s", source, exc)
            values = []
        if values:
            archive = MmapedDict(os.path.join(self.path, f"{kind}_archived.db"))
            try:
                for key, value in values:
                    total, _ = archive.read_value(key)
                    archive.write_value(key, total + value, 0.0)
            finally:
                archive.close()
        _remove(source)

    def collect_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        _DirectoryCollector(self, registry)
        return registry

    def cleanup(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


class _DirectoryCollector(MultiProcessCollector):
    """prometheus_client's collector, holding our lock and skipping unreadable files.

    A file caught between creation and its first write is empty, and stock
    prometheus_client then fails the whole scrape with ``struct.error``.
    """

    def __init__(self, directory: MultiprocDir, registry: CollectorRegistry) -> None:
        self.directory = directory
        super().__init__(registry, directory.path)

    def collect(self) -> Iterable[Metric]:
        with self.directory.lock:
            files = self.directory.files()
            try:
                return list(self.merge(files))
            except _UNREADABLE:
                return list(self.merge([name for name in files if _readable(name)]))


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
