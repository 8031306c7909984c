"""The app's own prometheus_client files, made safe for a full disk: dropped, not SIGBUS.

With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client (``mmap_dict.MmapedDict``) keeps
a process's values in files it sizes with ``truncate()`` and writes through a shared
memory map. truncate() only sets a size: on tmpfs and on disk filesystems the file is
sparse, and the first write to a page with no block behind it must allocate one at page
fault time. On a full filesystem that fails, and the kernel kills the writer with SIGBUS:
the worker dies mid-request, whatever the app does, and so does every replacement.

`install()` (before the app is imported) swaps MmapedDict for a subclass that reserves
the blocks for real, with ``posix_fallocate()``, before it maps or grows a file: a full
disk is then an ENOSPC from that call, never a SIGBUS from a later write, as every page
mapped is backed. A series that gets no room lives in process memory instead: the app's
metric objects go on working (``inc``, ``observe``, ``set``, reading them back), their
samples are missing from /metrics, and every write to them is counted. The worker sends
the count to the master (`deliver`), which serves it as
``asgi_supervise_app_metric_samples_dropped_total``; each worker logs the first failure.
Series that did get room keep working, and new series get files again once there is room.

The swap happens when prometheus_client is first imported (an import hook), so a worker
whose app does not use prometheus_client does not import it (~2 MB, ~0.1 s) for nothing.

Limits. fallocate reserves blocks on tmpfs, ext4 and XFS. On copy-on-write filesystems
(btrfs, ZFS) a write to a reserved block may still need new space: put the directory on
tmpfs, as the default (the temp directory) or a memory-backed volume does. Where the
filesystem has no fallocate (EOPNOTSUPP: musl on NFS, say), each reserved range is
written through with pwrite() instead, which allocates its blocks just the same. The
subclass reproduces MmapedDict's file layout and behaviour (prometheus_client 0.x, the
layout its own multiprocess collector reads); when a prometheus_client lacks the helpers
it builds on, nothing is swapped and a warning says so.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.abc
import logging
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from asgi_supervise.protocol import APP_SAMPLES_DROPPED

log = logging.getLogger("asgi_supervise.worker")

ENV_VARS = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")  # the old name too
MODULE = "prometheus_client.mmap_dict"
USERS = ("prometheus_client.values", "prometheus_client.multiprocess")  # bind it by name
HELPERS = ("MmapedDict", "_INITIAL_MMAP_SIZE", "_pack_integer", "_unpack_integer")
HELPERS += ("_pack_two_doubles", "_unpack_two_doubles", "_read_all_values")
NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)
CHUNK = 1 << 16


class Drops:
    """Writes dropped in this process, and how many of them the master has heard of."""

    dropped = 0
    delivered = 0
    logged = False


def install() -> None:
    """Swap MmapedDict as soon as prometheus_client is imported; idempotent.

    Only with PROMETHEUS_MULTIPROC_DIR set: otherwise prometheus_client keeps its values
    in memory and writes no file.
    """
    if not any(os.environ.get(name) for name in ENV_VARS):
        return
    module = sys.modules.get(MODULE)
    if module is not None:  # imported already (sitecustomize?): swap it where it is used
        adapt(module)
    elif not any(isinstance(finder, _Hook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def deliver(offer: Callable[[dict[str, Any]], bool]) -> None:
    """Tell the master how many writes were dropped since the last delivery, if any."""
    pending = Drops.dropped - Drops.delivered
    if pending > 0 and offer({"t": "metrics", APP_SAMPLES_DROPPED: pending}):
        Drops.delivered += pending


def adapt(module: ModuleType) -> None:
    """Swap ``module.MmapedDict`` (and the names other modules bound it to) for ours."""
    base = getattr(module, "MmapedDict", None)
    if getattr(base, "reserves_blocks", False):
        return
    missing = [name for name in HELPERS if not hasattr(module, name)]
    if missing:
        log.warning(
            "prometheus_client's MmapedDict is not the one expected (no %s): app metrics "
            "are written as it writes them, and a full metrics disk can crash workers",
            ", ".join(missing),
        )
        return
    adapted = reserving_class(module)
    module.MmapedDict = adapted  # type: ignore[attr-defined]
    for name in USERS:
        user = sys.modules.get(name)
        if user is not None and getattr(user, "MmapedDict", None) is base:
            user.MmapedDict = adapted  # type: ignore[attr-defined]


def reserve(fd: int, size: int) -> None:
    """Allocate the blocks of bytes [0, size) of a file, growing it to `size` if smaller.

    OSError (ENOSPC, EDQUOT, EFBIG...) when the filesystem cannot: then nothing mapped
    later can fault for want of space.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in NO_FALLOCATE:
            raise
        write_through(fd, size)


def write_through(fd: int, size: int) -> None:
    """Rewrite bytes [0, size) as they are (zeros past the end): every block allocated.

    Only for a file no one else writes meanwhile: a process's own metrics file, under
    prometheus_client's lock (or before it is shared at all).
    """
    for offset in range(0, size, CHUNK):
        length = min(CHUNK, size - offset)
        data = os.pread(fd, length, offset).ljust(length, b"\0")
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written


def _dropped(count: int = 1) -> None:
    Drops.dropped += count


def _no_room(path: str, exc: OSError) -> None:
    if not Drops.logged:
        Drops.logged = True
        log.warning(
            "app metrics: no room for %s (%s): samples of series without room are dropped "
            "(counted in asgi_supervise_app_metric_samples_dropped_total), the app goes on",
            path,
            exc.strerror or exc,
        )


def reserving_class(module: ModuleType) -> type:
    """MmapedDict, reserving every block before it maps it; see the module docstring."""
    base: Any = module.MmapedDict
    initial: int = module._INITIAL_MMAP_SIZE
    pack_integer = module._pack_integer
    unpack_integer = module._unpack_integer
    pack_two_doubles = module._pack_two_doubles
    unpack_two_doubles = module._unpack_two_doubles
    read_all_values = module._read_all_values

    class ReservingMmapedDict(base):  # type: ignore[misc, valid-type]
        """A dict of doubles in a memory-mapped file whose every page has its block.

        Keys that got no room ("detached") keep their value in memory only.
        """

        reserves_blocks = True

        def __init__(self, filename: str, read_mode: bool = False) -> None:
            if read_mode:  # maps read-only, writes nothing
                super().__init__(filename, read_mode=True)
                return
            self._fname = filename
            self._f: Any = None
            self._m: Any = None
            self._capacity = self._used = 0
            self._positions: dict[str, int] = {}
            self._detached: dict[str, tuple[float, float]] = {}
            size = 0
            try:
                self._f = open(filename, "a+b")  # noqa: SIM115 - closed by close()
                size = os.fstat(self._f.fileno()).st_size
                capacity = size or initial
                reserve(self._f.fileno(), capacity)
                self._m = mmap.mmap(self._f.fileno(), capacity, access=mmap.ACCESS_WRITE)
            except OSError as exc:
                self._give_up(exc, remove=size == 0)
                return
            self._capacity = capacity
            self._used = unpack_integer(self._m, 0)[0]
            if self._used == 0:
                self._used = 8
                pack_integer(self._m, 0, self._used)
            else:
                for key, _, _, pos in self._read_all_values():
                    self._positions[key] = pos

        def _give_up(self, exc: OSError, remove: bool) -> None:
            """No room for the file at all: every key lives in memory."""
            if self._f is not None:
                self._f.close()
                self._f = None
                if remove:  # ours and empty: a scrape would only stumble on it
                    with contextlib.suppress(OSError):
                        os.remove(self._fname)
            _no_room(self._fname, exc)

        def _init_value(self, key: str) -> None:
            if self._m is None:
                self._detached[key] = (0.0, 0.0)
                return
            encoded = key.encode("utf-8")
            padded = encoded + (b" " * (8 - (len(encoded) + 4) % 8))
            value = struct.pack(f"i{len(padded)}sdd".encode(), len(encoded), padded, 0.0, 0.0)
            capacity = self._capacity
            while self._used + len(value) > capacity:
                capacity *= 2
            if capacity > self._capacity:
                try:
                    reserve(self._f.fileno(), capacity)
                    grown = mmap.mmap(self._f.fileno(), capacity)
                except OSError as exc:
                    _no_room(self._fname, exc)
                    self._detached[key] = (0.0, 0.0)
                    return
                self._m.close()
                self._m, self._capacity = grown, capacity
            self._m[self._used : self._used + len(value)] = value
            self._used += len(value)
            pack_integer(self._m, 0, self._used)
            self._positions[key] = self._used - 16

        def _read_all_values(self) -> Iterator[tuple[str, float, float, int]]:
            if self._m is None:
                return iter(())
            return read_all_values(data=self._m, used=self._used)

        def read_all_values(self) -> Iterator[tuple[str, float, float]]:
            for key, value, timestamp, _ in self._read_all_values():
                yield key, value, timestamp
            for key, (value, timestamp) in self._detached.items():
                yield key, value, timestamp

        def _slot(self, key: str) -> int | None:
            """The key's place in the file, made on first use; None: no room for it, so
            its value lives in `_detached`."""
            if key not in self._positions and key not in self._detached:
                self._init_value(key)
            return self._positions.get(key)

        def read_value(self, key: str) -> tuple[float, float]:
            pos = self._slot(key)
            if pos is None:
                return self._detached[key]
            return unpack_two_doubles(self._m, pos)

        def write_value(self, key: str, value: float, timestamp: float) -> None:
            pos = self._slot(key)
            if pos is None:
                self._detached[key] = (value, timestamp)
                _dropped()
                return
            pack_two_doubles(self._m, pos, value, timestamp)

        def close(self) -> None:
            if self._f:
                self._m.close()
                self._m = None
                self._f.close()
                self._f = None

    return ReservingMmapedDict


class _Hook(importlib.abc.MetaPathFinder):
    """Finds prometheus_client.mmap_dict as the others would, and adapts it once run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AdaptingLoader(spec.loader)
        return spec


class _AdaptingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        adapt(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...
        return getattr(self.loader, name)
