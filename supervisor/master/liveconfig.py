"""Live configuration: what a reload (SIGHUP, `asgi-supervise reload`) may change.

The master re-reads every layer (profile, config file, environment as it started, its
command line), validates like at start, and applies what the replaced workers and its own
loop can take; what was bound or started once (addresses, the metrics server, the
watcher, the pid file, the control socket) keeps its running value until a restart.
The env file (`--env-file`) is read by each new worker, so a reload picks it up too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asgi_supervise.config.settings import FIELDS, Settings, redact
from asgi_supervise.config.sources import Loaded

# Bound, opened or started once by the master: a restart changes them.
RESTART_ONLY = frozenset(
    {
        "host", "port", "uds", "fd", "backlog", "worker_start",
        "metrics", "metrics_host", "metrics_port", "multiproc_dir", "min_ready",
        "pid_file", "control_socket", "log_file", "log_config", "engine",
        "reload", "reload_dirs", "reload_includes", "reload_excludes", "reload_delay",
    }
)  # fmt: skip
LOGGING = ("log_format", "log_level", "access_log", "use_colors")


@dataclass
class Change:
    loaded: Loaded  # what the master now runs with: the new layers, restart-only ones kept
    applied: list[str] = field(default_factory=list)  # "workers 2 -> 3 (file: conf.toml)"
    kept: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.loaded.settings

    def changed(self, *names: str) -> bool:
        return any(line.split(" ", 1)[0] in names for line in self.applied)


def _shown(name: str, value: Any) -> str:
    return repr(redact(name, value))


def reconcile(running: Loaded, new: Loaded) -> Change:
    """The settings to run with after a reload, and what changed or could not."""
    old_values, new_values = running.settings, new.settings
    keep: dict[str, Any] = {}
    origins = dict(new.origins)
    applied, kept = [], []
    for name in FIELDS:
        before, after = getattr(old_values, name), getattr(new_values, name)
        if before == after:
            continue
        line = f"{name} {_shown(name, before)} -> {_shown(name, after)} ({new.origin(name)})"
        if name in RESTART_ONLY:
            keep[name] = before
            origins[name] = running.origins.get(name)
            kept.append(line)
        else:
            applied.append(line)
    settings = new_values.model_copy(update=keep) if keep else new_values
    return Change(Loaded(settings, origins, new.profile), applied, kept)
