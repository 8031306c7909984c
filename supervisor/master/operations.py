"""What operators ask of a running master: signals and the control socket's commands.

Part of the arbiter (a mixin over its state). Both arrive queued and run in the master's
loop, so the worker table keeps one owner: SIGHUP and `reload` re-read the configuration
and roll the workers, SIGTTIN/SIGTTOU and `scale` change the slots, SIGTERM and `stop`
drain, `status` and `config --running` answer from the table and the sources.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from asgi_supervise import drain, logs, sizing
from asgi_supervise.master import control, liveconfig
from asgi_supervise.master.phase import Phase
from asgi_supervise.sizing import host

log = logging.getLogger("asgi_supervise.master")


class Operations:
    """Mixed into `Arbiter`: these run on its state, in its loop."""

    # --- the control socket (`asgi-supervise status | reload | scale | stop`) -------------

    def queue_command(self, command: str, request: dict[str, Any], future: asyncio.Future) -> None:
        self._commands.append((command, request, future))
        self._wake.set()

    def handle_commands(self) -> None:
        while self._commands:
            command, request, future = self._commands.popleft()
            if future.done():  # the client went away
                continue
            try:
                result = getattr(self, f"command_{command}")(request, future)
            except control.ControlError as exc:
                future.set_exception(exc)
                continue
            if result is not None:
                future.set_result(result)

    def command_status(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        status = self.observe.status(self)
        status["master"].update(
            pid=os.getpid(),
            control_socket=self.control.path if self.control else None,
            last_reload=self.last_reload,
        )
        for worker in status["workers"]:
            worker["restarts"] = self.restarts[worker["slot"]]
        status["plan_text"] = self.observe.plan.render()
        return status

    def command_reload(self, request: dict[str, Any], future: asyncio.Future) -> None:
        """Answered when the rollout ends (`reload_finished`): the client waits for it."""
        if not self.running:
            raise control.ControlError(f"the master is {self.phase.value}: no reload")
        if self.waiting_for_fix:
            raise control.ControlError("the app cannot start: waiting for a file change")
        error = self.reconfigure("control socket: reload")
        if error is not None:
            raise control.ControlError(
                f"the new config is invalid, nothing was reloaded (the running config stays): "
                f"{error}"
            )
        self.reload_waiters.append(future)
        self.reload("control socket: reload")

    def command_scale(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        if not self.running:
            raise control.ControlError(f"the master is {self.phase.value}: no scaling")
        given = str(request.get("workers", "")).strip()
        try:
            number = int(given)
        except ValueError:
            raise control.ControlError(f"scale {given!r}: expected N, +N or -N") from None
        target = self.target + number if given[:1] in "+-" else number
        if target < 1:
            raise control.ControlError(
                f"scale {given}: {target} workers refused: at least 1 (use stop to stop)"
            )
        warnings = self.scale_to(target, "control socket")
        return {"workers": self.target, "warnings": warnings}

    def command_stop(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        if request.get("now"):
            self.handle_sigquit()
        elif self.phase is Phase.RUNNING:
            log.info("control socket: draining", extra={"event": "drain"})
            self.phase = Phase.DRAINING
        return {"pid": os.getpid(), "phase": self.phase.value}

    def command_config(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        if self.loaded is None:
            raise control.ControlError("the master kept no record of its settings' sources")
        return self.loaded.document()

    def answer_reload_waiters(self, error: str | None = None) -> None:
        waiters, self.reload_waiters = self.reload_waiters, []
        for future in waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(control.ControlError(error))
            else:
                future.set_result(self.last_reload)

    def over_plan(self, workers: int) -> list[str]:
        """Each sizing budget `workers` exceeds, with its numbers (`plan` explains them)."""
        if workers <= self.observe.plan.workers:
            return []
        settings = self.settings.model_copy(update={"workers": workers})
        return sizing.over_budgets(settings, host.read_host(), workers)

    def scale_to(self, target: int, why: str) -> list[str]:
        """Add or remove slots (removal drains the highest ones); warn above the plan."""
        while self.target < target:
            self.table.add_slot()
        while self.target > max(1, target):
            slot = self.table.remove_slot()
            self.observe.slot_removed(slot)
            for worker in self.live():
                if worker.slot == slot:
                    self.stop_worker(worker, "scale-down", self.drain_times.abort_after)
        log.info(
            "%s: %d workers", why, self.target, extra={"event": "scale", "workers": self.target}
        )
        warnings = self.over_plan(self.target)
        for warning in warnings:
            log.warning(
                "%d workers is above the sizing plan (%d): %s",
                self.target, self.observe.plan.workers, warning,
                extra={"event": "sizing_warning"},
            )  # fmt: skip
        self.wake()
        return warnings

    def handle_sigchld(self) -> None:
        self.reap()

    def handle_sigterm(self) -> None:
        if self.phase is Phase.RUNNING:
            log.info("SIGTERM/SIGINT: draining (a second one stops now)", extra={"event": "drain"})
            self.phase = Phase.DRAINING
        else:
            self.handle_sigquit()

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        if self.phase is Phase.STOPPING:
            return
        log.warning("stopping now: in-flight requests are cut", extra={"event": "stop_now"})
        self.phase = Phase.STOPPING
        self.unclean()
        for worker in self.live():
            worker.hurry(signal.SIGQUIT)

    def handle_sighup(self) -> None:
        if self.running and self.reconfigure("SIGHUP") is None:
            self.reload("SIGHUP")

    def reconfigure(self, why: str) -> str | None:
        """Re-read the config, validate it, apply what can change without a restart and
        name what cannot. An invalid config keeps the running one: its one-line error is
        returned (and logged), and the caller reloads nothing."""
        if self.reloader is None or self.loaded is None:
            return None
        from asgi_supervise.config.values import ConfigError

        try:
            new = self.reloader()
            if (
                new.settings.app != self.settings.app
                or new.settings.app_dir != self.settings.app_dir
            ):
                new.check_app()
        except ConfigError as exc:
            error = str(exc)
            log.error(
                "%s: the new config is invalid, nothing reloaded; the running config stays: %s",
                why, error, extra={"event": "config_invalid", "error": error},
            )  # fmt: skip
            self.last_reload = {
                "outcome": "aborted", "duration_s": 0.0, "error": error,
                "finished_at": time.time(), "generation": self.rollout.generation,
            }  # fmt: skip
            return error
        for note in new.notes:  # a re-read gunicorn config: what it sets to no effect
            log.warning("%s: %s", why, note, extra={"event": "config_ignored"})
        change = liveconfig.reconcile(self.loaded, new)
        if change.kept:
            log.warning(
                "%s: not applied without a restart (running values kept): %s",
                why, "; ".join(change.kept), extra={"event": "config_kept"},
            )  # fmt: skip
        self.loaded = change.loaded
        self.config_change = {"config_applied": change.applied, "config_kept": change.kept}
        self.apply_settings(change)
        if change.applied:
            log.info(
                "%s: config applied: %s", why, "; ".join(change.applied),
                extra={"event": "config_applied"},
            )  # fmt: skip
        return None

    def apply_settings(self, change: liveconfig.Change) -> None:
        """New settings for the master's loop; the replaced workers get them at spawn."""
        s = self.settings = change.settings
        self.rollout.settings = self.observe.settings = s
        self.rollout.db_share = sizing.db_share(s)
        self.drain_times = drain.of(s)
        self.boot.limit = s.boot_failure_limit
        if change.changed(*liveconfig.LOGGING):
            logs.configure(
                s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config
            )
        plan = sizing.plan(s, host.read_host())
        resize = plan.workers != self.observe.plan.workers
        self.observe.plan = plan
        self.observe.metrics.set_plan(plan.to_dict())
        if resize:
            self.scale_to(plan.workers, "config")

    def reload(self, why: str) -> None:
        """Replace every worker, new code first (SIGHUP, or a file change with --reload)."""
        if not self.running:
            return
        self.rollout.start(why)
        self.notify.reloading()
        self.wake()

    def reload_finished(self, seconds: float, outcome: str) -> None:
        self.observe.reload_finished(seconds, outcome)
        error = self.last_boot_error if outcome == "aborted" else None
        self.last_reload = {
            "outcome": outcome,
            "duration_s": round(seconds, 3),
            "error": error,
            "finished_at": time.time(),
            "generation": self.rollout.generation,
            **self.config_change,
        }
        self.config_change = {}
        self.answer_reload_waiters()
        self.notify.ready(f"serving with {self.target} workers ({outcome})")

    def files_changed(self, paths: list[str]) -> None:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        if self.waiting_for_fix:
            log.info("%s changed: trying to start again", shown)
            self.waiting_for_fix = False
            self.boot.succeeded()
            return
        self.reload(f"{shown} changed")

    def handle_sigusr1(self) -> None:
        logs.reopen()
        for worker in self.live():
            worker.send_signal(signal.SIGUSR1)
        log.info("SIGUSR1: log files reopened", extra={"event": "reopen_logs"})

    def handle_sigttin(self) -> None:
        self.scale_to(self.target + 1, "SIGTTIN")

    def handle_sigttou(self) -> None:
        if self.target <= 1:
            log.info("SIGTTOU ignored: already at 1 worker")
            return
        self.scale_to(self.target - 1, "SIGTTOU")
