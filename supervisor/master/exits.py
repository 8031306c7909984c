"""How the master takes a worker's exit: a crash, a kill from outside, a failed boot.

Part of the arbiter (a mixin over its state); the decisions are `policy`'s: backoff only
for workers that die young, a kill from outside is no boot failure, the last serving
worker is always respawned at once.
"""

from __future__ import annotations

import logging
import time

from asgi_supervise.master import policy
from asgi_supervise.master.phase import Phase
from asgi_supervise.master.workers import Worker
from asgi_supervise.protocol import Exit

log = logging.getLogger("asgi_supervise.master")


class Exits:
    """Mixed into `Arbiter`: called from `reap` for every worker it collects."""

    def worker_exited(self, worker: Worker) -> None:
        now = time.monotonic()
        extra = worker.extra("exited", status=worker.exit_status, reason=worker.stop_reason)
        if worker.stop_reason is None and self.phase is not Phase.RUNNING:
            log.info("%s %s while the master stops", worker.tag(), worker.exit_status, extra=extra)
            return
        if worker.stop_reason is not None:
            took = now - (worker.stopping_since or now)
            drained = worker.drained or {}
            if worker.process.returncode == Exit.UNCLEAN:
                log.warning(
                    "%s %s after draining %.2fs (%s): %d request(s) cut at the graceful"
                    " timeout, lifespan shutdown: %s",
                    worker.tag(), worker.exit_status, took, worker.stop_reason,
                    drained.get("cut", 0), drained.get("lifespan", "unknown"),
                    extra={**extra, **drained},
                )  # fmt: skip
                self.unclean()
            else:
                log.info(
                    "%s %s after draining %.2fs (%s)%s",
                    worker.tag(), worker.exit_status, took, worker.stop_reason,
                    f": {drained['streams_ended']} stream(s) ended"
                    if drained.get("streams_ended") else "",
                    extra=extra,
                )  # fmt: skip
            new = self.table.get(worker.replaced_by)
            if new is not None:
                log.info(
                    "worker %d replaced (%s) in %.2fs: pid %d -> %d",
                    worker.slot, worker.stop_reason, now - new.started, worker.pid, new.pid,
                    extra=worker.extra("replaced", reason=worker.stop_reason, new_pid=new.pid),
                )  # fmt: skip
            return
        if worker.ready_at is None:
            killed_by_master = worker.failure is not None
            kind = policy.boot_exit(worker.exit_signal, worker.boot_error, killed_by_master)
            if kind is policy.BootExit.KILLED:
                self.killed_while_booting(worker)
            elif worker.replaces is not None:
                self.rollout.failed(worker)
            else:
                self.boot_failed(worker)
            return
        self.restarts[worker.slot] += 1
        delay = self.crashed(worker, worker.uptime(now))
        cause = worker.failure or worker.exit_status
        if worker.exit_status == "killed by SIGKILL" and worker.failure is None:
            cause += " (out of memory?)"
        log.warning(
            "%s died: %s; respawning %s",
            worker.tag(),
            cause,
            f"in {delay:.1f}s" if delay else "now",
            extra={**extra, "cause": cause, "respawn_delay_s": delay},
        )

    def crashed(self, worker: Worker, uptime: float) -> float:
        """The slot's respawn delay (`policy.SlotHealth.crashed`): none if it served, and
        none if it was the last one serving while the app is known to boot."""
        alone = self.serving() == 0 and self.app_boots
        cap = self.settings.restart_backoff_max
        health = self.table.slots.get(worker.slot)
        if health is None:  # its slot went with SIGTTOU
            return 0.0
        return health.crashed(time.monotonic(), uptime, cap, requests=worker.requests, alone=alone)

    def killed_while_booting(self, worker: Worker) -> None:
        """A signal from outside (OOM killer, an operator) says nothing about the app: the
        slot is refilled, with crash backoff if it keeps happening, and the boot-failure
        count stands. A replacement's old worker keeps serving and gets a new one."""
        old = self.table.get(worker.replaces)
        if old is not None and old.replaced_by == worker.pid:
            old.replaced_by = None
        delay = self.crashed(worker, 0.0)
        log.warning(
            "%s %s while booting (not counted as a failure to start); %s %s",
            worker.tag(),
            worker.exit_status,
            "replacing it" if old is None else f"starting another replacement for pid {old.pid}",
            f"in {delay:.1f}s" if delay else "now",
            extra=worker.extra("killed_booting", status=worker.exit_status, respawn_delay_s=delay),
        )

    def report_boot_error(self, worker: Worker, attempt: str) -> str:
        """Log why a worker failed to start: in full the first time, one line when repeated."""
        error = worker.boot_error or worker.failure or worker.exit_status or "unknown"
        headline = error.strip().splitlines()[-1] if error.strip() else error
        extra = worker.extra("boot_failed", error=headline, attempt=attempt)
        if error == self.boot.last_error:
            log.error("%s failed to start (%s): same error", worker.tag(), attempt, extra=extra)
        else:
            log.error("%s failed to start (%s):\n%s", worker.tag(), attempt, error, extra=extra)
        self.boot.last_error = error
        self.last_boot_error = error
        return headline

    def boot_failed(self, worker: Worker) -> None:
        attempt = f"{self.boot.failures + 1}/{self.boot.limit}"
        headline = self.report_boot_error(worker, attempt)
        fatal = self.boot.failed(worker.boot_error)
        if fatal and self.settings.reload:
            log.error("the app cannot start: waiting for a file change to try again")
            self.waiting_for_fix = True
            return
        if fatal:
            log.critical(
                "giving up: %d workers in a row failed to start: %s",
                self.boot.failures,
                headline,
                extra={"event": "boot_failure", "error": headline},
            )
            self.exit_code = Exit.BOOT_FAILURE
            self.phase = Phase.STOPPING
            return
        delay = self.crashed(worker, 0.0)
        if delay:
            log.info("%s slot respawns in %.1fs", worker.tag(), delay)
