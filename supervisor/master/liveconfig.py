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

from asgi_supervise.config.values import Loaded, Values

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
    def settings(self) -> Values:
        return self.loaded.settings

    def changed(self, *names: str) -> bool:
        return any(line.split(" ", 1)[0] in names for line in self.applied)


def reconcile(running: Loaded, new: Loaded) -> Change:
    """The settings to run with after a reload, and what changed or could not."""
    old_values, new_values = running.settings, new.settings
    keep: dict[str, Any] = {}
    origins, given = dict(new.origins), dict(new.given)
    applied, kept = [], []
    for name in new_values.names:
        before, after = getattr(old_values, name), getattr(new_values, name)
        if before == after:
            continue
        shown = f"{new_values.hidden(name, before)!r} -> {new_values.hidden(name, after)!r}"
        line = f"{name} {shown} ({new.origin(name)})"
        if name in RESTART_ONLY:
            keep[name] = before
            for record, running_record in ((origins, running.origins), (given, running.given)):
                record.pop(name, None)
                if name in running_record:
                    record[name] = running_record[name]
            kept.append(line)
        else:
            applied.append(line)
    settings = new_values.model_copy(update=keep) if keep else new_values
    return Change(Loaded(settings, origins, given, new.profile), applied, kept)
