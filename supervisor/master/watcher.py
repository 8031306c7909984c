"""Dev reload: watch the source tree and ask the master for a replacement-first reload.

The master does the rest exactly as for SIGHUP: the new worker must be ready before the
old one drains, and new code that fails to start leaves the old worker serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import watchfiles

from asgi_supervise.config.values import Values

log = logging.getLogger("asgi_supervise.master.watcher")


class SourceFilter(watchfiles.DefaultFilter):
    """watchfiles' defaults (VCS, caches, virtualenvs) plus --reload-include/--reload-exclude.

    Patterns match a file's name, its path relative to the watched directory, or any
    directory on that path, so `.venv/*`, `*.py` and `.*` all mean what they look like.
    """

    def __init__(self, roots: list[Path], includes: list[str], excludes: list[str]):
        super().__init__()
        self.roots = roots
        self.includes = includes
        self.excludes = excludes

    def _relative(self, path: Path) -> Path:
        for root in self.roots:
            if path.is_relative_to(root):
                return path.relative_to(root)
        return path

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if not super().__call__(change, path):
            return False
        relative = self._relative(Path(path))
        names = [relative.as_posix(), *relative.parts]
        if any(fnmatch(name, pattern) for pattern in self.excludes for name in names):
            return False
        return any(
            fnmatch(relative.name, pattern) or fnmatch(relative.as_posix(), pattern)
            for pattern in self.includes
        )


def watched_dirs(settings: Values) -> list[Path]:
    dirs = settings.reload_dirs or [settings.app_dir]
    return [Path(d).resolve() for d in dirs]


class Watcher:
    """Runs beside the master's loop; one callback per burst of saves."""

    def __init__(self, settings: Values, changed: Callable[[list[str]], None]):
        self.roots = watched_dirs(settings)
        self.filter = SourceFilter(self.roots, settings.reload_includes, settings.reload_excludes)
        self.quiet_ms = max(50, int(settings.reload_delay * 1000))
        self.changed = changed
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        log.info("watching %s for changes", ", ".join(map(str, self.roots)))
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        async for changes in watchfiles.awatch(
            *self.roots,
            watch_filter=self.filter,
            step=self.quiet_ms,  # a burst ends after this much quiet...
            debounce=max(1600, self.quiet_ms * 4),  # ...or after this long at most
            stop_event=self.stop_event,
        ):
            paths = sorted({str(self._short(path)) for _, path in changes})
            self.changed(paths)

    def _short(self, path: str) -> Path:
        return self.filter._relative(Path(path))

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await self.task
