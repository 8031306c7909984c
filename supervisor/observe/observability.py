"""What the master shows: its metrics, the health server, and the /status document.

The arbiter reports lifecycle events here; this module turns them into Prometheus
metrics and answers probes. With `--no-metrics` every call is a no-op (`OFF`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from asgi_supervise.config.values import Values
from asgi_supervise.master.workers import State, Worker
from asgi_supervise.protocol import APP_SAMPLES_DROPPED
from asgi_supervise.sizing import Plan

if TYPE_CHECKING:
    from asgi_supervise.master.arbiter import Arbiter
    from asgi_supervise.master.forkserver import ForkServers
    from asgi_supervise.observe.health import HealthServer
    from asgi_supervise.observe.metrics import SupervisorMetrics
    from asgi_supervise.observe.multiproc import MultiprocDir

log = logging.getLogger("asgi_supervise.master")


class _Off:
    """The metrics and their directory under --no-metrics: every call, at any depth
    (``metrics.requests.add(...)``), does nothing and returns None."""

    def __getattr__(self, name: str) -> _Off:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


OFF: Any = _Off()


def writable_tempdir() -> str:
    """The temp directory the workers' metrics files go to by default (``TMPDIR``, /tmp, ...).

    On a read-only root filesystem with no writable volume there is none; the error then
    says what to set rather than tempfile's "No usable temporary directory found".
    """
    try:
        return tempfile.gettempdir()
    except FileNotFoundError as exc:
        raise OSError(
            f"no writable directory for the workers' metrics files ({exc}): set "
            "--multiproc-dir (ASGI_SUPERVISE_MULTIPROC_DIR) or TMPDIR to a writable "
            "directory, e.g. a tmpfs or, in Kubernetes, an emptyDir volume"
        ) from None


def metrics_directory(settings: Values) -> MultiprocDir | None:
    """The workers' metrics directory (None with --no-metrics), made before any worker
    starts: its path is in their environment. OSError says what to set instead."""
    if not settings.metrics:
        return None
    from asgi_supervise.observe.multiproc import MultiprocDir

    if settings.multiproc_dir is None:
        writable_tempdir()
    return MultiprocDir.create(settings.multiproc_dir)


class Observability:
    def __init__(self, settings: Values, plan: Plan, directory: MultiprocDir | None = None):
        self.settings = settings
        self.plan = plan
        self.metrics: SupervisorMetrics = OFF  # until start(), and for good with --no-metrics
        self.dir: MultiprocDir = directory or OFF  # `metrics_directory`
        self.server: HealthServer | None = None

    async def start(self, arbiter: Arbiter) -> None:
        """Bind the health port before any worker exists: a busy port fails the start."""
        s = self.settings
        if not s.metrics:
            return
        # Imported only when used: prometheus_client and uvicorn cost the master ~30 MB.
        from asgi_supervise.observe.health import HealthApp, readiness, start_server
        from asgi_supervise.observe.metrics import SupervisorMetrics, render

        self.metrics = metrics = SupervisorMetrics()
        metrics.set_plan(self.plan.to_dict())

        def verdict() -> tuple[bool, str]:
            return readiness(
                not arbiter.running, arbiter.ready_count(), arbiter.target, s.min_ready
            )

        metrics.set_readiness(lambda: verdict()[0])  # the probe's answer, as a gauge
        app = HealthApp(
            status=lambda: self.status(arbiter),
            readiness=verdict,
            metrics=lambda accept: render(accept, self.dir, metrics),
        )
        try:
            self.server = await start_server(app, s.metrics_host, s.metrics_port)
        except OSError:
            self.dir.cleanup()
            raise
        where = f"http://{s.metrics_host}:{self.server.port}"
        log.info("metrics and health on %s (/metrics /livez /readyz /status)", where)

    def worker_environ(self) -> dict[str, str] | None:
        """Workers' prometheus_client (ours and the app's) writes into our directory."""
        return self.dir.environ()

    # --- lifecycle events -------------------------------------------------------------

    def worker_started(self, worker: Worker) -> None:
        self.dir.worker_started(worker.pid)
        self.metrics.worker_started()

    def worker_ready(self, worker: Worker, boot_seconds: float) -> None:
        self.metrics.worker_ready(boot_seconds)

    def worker_exited(self, worker: Worker) -> None:
        """Called as soon as the pid is reaped: the kernel may hand the pid out again."""
        self.dir.worker_exited(worker.pid)
        self.metrics.requests.worker_gone(worker.pid)
        self.metrics.worker_exited(worker.exit_reason)
        self.metrics.header_timeouts_final(worker.pid, worker.header_timeouts)
        if worker.stopping_since is not None:  # it drained: from the stop request to now
            self.metrics.observe_drain(time.monotonic() - worker.stopping_since)

    def requests_reported(self, worker: Worker) -> None:
        reports, worker.reports = worker.reports, []
        for report in reports:
            try:
                self.metrics.requests.add(worker.pid, report)
                self.metrics.app_samples_dropped(report.get(APP_SAMPLES_DROPPED, 0))
            except ValueError as exc:
                log.warning("%s: %s", worker.tag(), exc)

    def sampled(self, workers: list[Worker]) -> None:
        self.metrics.set_worker_states(Counter(w.state.value for w in workers))
        for worker in workers:
            self.metrics.header_timeouts_seen(worker.pid, worker.header_timeouts)
            if worker.state is State.READY and worker.stop_reason is None:
                self.metrics.sample_worker(
                    worker.slot, worker.rss, worker.cpu_percent, worker.requests
                )

    def fork_servers_sampled(self, forks: ForkServers) -> None:
        current = forks.current
        self.metrics.set_fork_server(
            {
                "generation": -1 if current is None else current.generation,
                "starts": forks.starts,
                "rss": 0 if current is None else current.rss,
                "pss": 0 if current is None else current.pss,
            }
        )

    def slot_removed(self, slot: int) -> None:
        self.metrics.forget_slot(slot)

    def reload_finished(self, seconds: float, outcome: str) -> None:
        self.metrics.observe_reload(seconds, outcome)

    def draining(self) -> None:
        self.metrics.set_draining(True)

    async def stop(self) -> None:
        """Last thing the master does, so /readyz says 503 through the whole drain."""
        if self.server is not None:
            await self.server.stop()
        self.dir.cleanup()

    # --- /status ----------------------------------------------------------------------

    def status(self, arbiter: Arbiter) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "master": {
                "phase": arbiter.phase.value,
                "uptime_s": round(now - arbiter.started, 3),
                "workers_target": arbiter.target,
                "workers_ready": arbiter.ready_count(),
                "reloading": arbiter.rollout.in_progress,
                "generation": arbiter.rollout.generation,
                "worker_start": self.settings.worker_start,
            },
            "fork_servers": [
                server.status(now)
                for server in (arbiter.forks.alive() if arbiter.forks is not None else ())
            ],
            "workers": [
                {
                    "slot": w.slot,
                    "pid": w.pid,
                    "state": w.state.value,
                    "age_s": round(now - w.started, 3),
                    "requests": w.requests,
                    "connections": w.connections,
                    "rss_bytes": w.rss,
                    "pss_bytes": w.pss or None,  # forked workers
                    "cpu_percent": w.cpu_percent,
                    "generation": w.generation,
                    "stopping": w.stop_reason,
                    "request_meter": w.meter,
                }
                for w in sorted(arbiter.live(), key=lambda w: (w.slot, w.started))
            ],
            "plan": self.plan.to_dict(),
        }
