"""How the master runs its fork servers (`--worker-start fork`, the default).

Part of the arbiter (a mixin over its state). One fork server per code generation: the
first at start; with --preload a new one for each rolling reload, which replaces the
current one once it is up (the workers are then replaced from it, replacement first).
Without --preload the fork server holds no app code, only uvicorn and ours, which a
reload does not change: it is kept and forks the new generation's workers, which import
the new code themselves (a reload then costs no interpreter start). With --preload the
new fork server is the current one's standby, forked before it imported the app (it
costs no interpreter start either); one is exec'd when there is none. A fork server that
dies is restarted with a worker slot's backoff while its workers keep serving; one whose
`--preload` import fails stops the master (exit 3), aborts a reload (the old workers and
fork server stay), or, with `--reload`, waits for the next save.
"""

from __future__ import annotations

import asyncio
import logging
import time

from asgi_supervise.master import forkserver, policy
from asgi_supervise.master.forkserver import ForkError, ForkServer, ForkServers
from asgi_supervise.master.phase import Phase
from asgi_supervise.master.workers import Worker, spawn
from asgi_supervise.protocol import Exit

log = logging.getLogger("asgi_supervise.master")


class Forking:
    """Mixed into `Arbiter`. `forks` is None in exec mode."""

    forks: ForkServers | None
    first: ForkServer | None  # started by `launch`, its first workers asked for (`start_first`)

    def start_forking(self) -> None:
        if self.settings.worker_start != "fork":
            self.forks = None
            return
        self.forks = ForkServers()
        if self.first is not None:  # before the first `reap`, which must know its pid
            self.fork_server_booting(self.first)
            self.first = None
        elif not forkserver.become_subreaper():
            log.warning("not a child subreaper (not Linux?): forked workers are reaped by init")
        self.ensure_fork_server()

    def first_workers_pending(self) -> bool:
        """Workers asked for before the loop ran (`start_first`) and not all claimed yet.

        Until they are, the master does not act on signals, commands or saved files: a
        reload or a scale then would find workers serving that it does not know of. It
        waits at most --ready-timeout (a fork server not up by then is killed)."""
        return self.forks is not None and any(server.requested for server in self.forks.alive())

    def can_spawn(self, generation: int | None = None) -> bool:
        """A worker can start now: exec mode, or a ready fork server (of `generation`)."""
        if self.forks is None:
            return True
        current = self.forks.current
        if current is None or not current.ready:
            return False
        return generation is None or current.generation >= generation

    def new_worker(self, slot: int) -> Worker | None:
        """Fork it from the current fork server, or exec it; None if the fork server failed
        (its exit is reaped and it is restarted)."""
        s = self.settings
        if self.forks is None:
            env = self.observe.worker_environ()
            return spawn(slot, s, self.sockets, self.rollout.generation, env)
        server = self.forks.current
        if server is None or not server.ready:
            return None  # `can_spawn` said so: callers ask it first
        try:
            process, channel = server.fork(slot, s)
        except ForkError as exc:
            log.warning("worker %d not started: %s", slot, exc)
            return None
        return Worker(slot, process, channel, server.generation)

    def ensure_fork_server(self) -> None:
        """Start the fork server the current code generation needs, unless one boots; kill
        one that is not up within --ready-timeout (an import that hangs)."""
        forks = self.forks
        if forks is None or not self.running or self.waiting_for_fix:
            return
        timeout = self.settings.ready_timeout
        for booting in forks.alive():
            if booting.state == "booting" and time.monotonic() - booting.started > timeout:
                log.error("%s not up after %gs (ready-timeout): killing", booting.tag(), timeout)
                booting.boot_error = f"not up within {timeout:g}s (--ready-timeout)"
                booting.kill()
        newest, current = forks.newest(), forks.current
        need = policy.fork_server_need(
            self.rollout.generation,
            None if newest is None else newest.generation,
            current is not None,
            forks.next is not None,
            self.settings.preload or (current is not None and current.preload),
            time.monotonic(),
            forks.health.not_before,
        )
        if need in (policy.ForkServerNeed.NONE, policy.ForkServerNeed.WAIT):
            return
        if need is policy.ForkServerNeed.KEEP and current is not None:
            log.info(
                "%s forks generation %d too (no --preload: it holds no app code)",
                current.tag(), self.rollout.generation,
                extra=current.extra("fork_server_kept", new_generation=self.rollout.generation),
            )  # fmt: skip
            current.generation = self.rollout.generation
            return
        if forks.next is not None:  # booting for a generation already superseded
            forks.next.retire()
        env = self.observe.worker_environ()
        standby = forks.standby()
        generation = self.rollout.generation
        server = forkserver.start(self.settings, self.sockets, generation, env, standby=standby)
        self.fork_server_booting(server)

    def fork_server_booting(self, server: ForkServer) -> None:
        assert self.forks is not None
        self.forks.add(server)
        asyncio.get_running_loop().add_reader(
            server.channel.fileno(), self.on_fork_server_message, server
        )
        log.info(
            "%s booting%s%s", server.tag(),
            " from the standby of the last one" if server.from_standby else "",
            " (preloading the app)" if server.preload else "",
            extra=server.extra("fork_server_booting", from_standby=server.from_standby),
        )  # fmt: skip

    def claim_exited(self, pid: int) -> Worker | None:
        """A worker asked for before the loop ran (`start_first`) that exited before it was
        claimed (an app that fails at import): claimed now, so its exit is seen."""
        if self.forks is None:
            return None
        for server in self.forks.alive():
            self.on_fork_server_message(server)  # its answers, read first
            slot = server.forked_slot(pid)
            if slot is not None and server is self.forks.current:
                return self.start_worker(slot)
        return None

    def on_fork_server_message(self, server: ForkServer) -> None:
        changed, eof = server.read_messages()
        if eof:
            asyncio.get_running_loop().remove_reader(server.channel.fileno())
        if not changed or not server.ready or self.forks is None or self.forks.next is not server:
            return
        old = self.forks.promote(server)
        took = (server.ready_at or server.started) - server.started
        log.info(
            "%s up, forking: imports took %.2fs%s", server.tag(), took,
            "" if old is None else f"; retiring the fork server of generation {old.generation}",
            extra=server.extra("fork_server_ready", boot_s=took),
        )  # fmt: skip
        if old is not None:
            old.retire()
        self.wake()

    def fork_server_exited(self, server: ForkServer, status: int) -> None:
        """From `reap`: a retired one is done; otherwise restart it, or take its boot error."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(server.channel.fileno())
        if server.state != "retiring":
            server.read_messages()  # its last words: a boot error
        server.channel.close()
        server.drop_requests()
        retired = server.state == "retiring"
        forks = self.forks
        assert forks is not None
        if retired or not self.running:
            server.drop_standby()
        else:
            forks.keep_orphan(server.take_standby())  # its restart starts from it
        server.exited(status)
        was_next = forks.next is server
        forks.forget(server)
        extra = server.extra("fork_server_exited", status=server.exit_status)
        if retired or not self.running:
            log.info("%s retired", server.tag(), extra=extra)
            return
        if server.boot_error:
            self.preload_failed(server, was_next)
            return
        uptime = 0.0 if server.ready_at is None else time.monotonic() - server.ready_at
        cap = self.settings.restart_backoff_max
        delay = forks.health.crashed(time.monotonic(), uptime, cap)
        log.warning(
            "%s died: %s; its workers keep serving; starting another %s",
            server.tag(), server.exit_status, f"in {delay:.1f}s" if delay else "now",
            extra={**extra, "respawn_delay_s": delay},
        )  # fmt: skip
        self.wake()

    def preload_failed(self, server: ForkServer, was_next: bool) -> None:
        """The app failed to import in the fork server: the same code fails in every worker."""
        error = server.boot_error or ""
        headline = error.strip().splitlines()[-1] if error.strip() else error
        extra = server.extra("boot_failed", error=headline)
        self.last_boot_error = error
        if error == self.boot.last_error:
            log.error("%s failed to import the app: same error", server.tag(), extra=extra)
        else:
            log.error("%s failed to import the app:\n%s", server.tag(), error, extra=extra)
        self.boot.last_error = error
        current = self.forks.current if self.forks is not None else None
        verdict = policy.preload_failure(current is not None and was_next, self.settings.reload)
        if verdict is policy.PreloadFailure.ABORT_RELOAD and current is not None:
            self.rollout.abort(headline)  # a reload's new code: the old workers keep serving
            current.generation = self.rollout.generation
            return
        if verdict is policy.PreloadFailure.WAIT_FOR_SAVE:
            log.error("the app cannot start: waiting for a file change to try again")
            self.waiting_for_fix = True
            return
        log.critical(
            "giving up: the app failed to import in the fork server (--preload): %s",
            headline,
            extra={"event": "boot_failure", "error": headline},
        )
        self.exit_code = Exit.BOOT_FAILURE
        self.phase = Phase.STOPPING

    def sample_fork_servers(self) -> None:
        """Their memory, with the workers' (once a second), for /status and the metrics."""
        if self.forks is not None:
            for server in self.forks.alive():
                server.sample()
            self.rollout.fork_servers_memory = sum(s.pss for s in self.forks.alive())
            self.observe.fork_servers_sampled(self.forks)

    def retire_fork_servers(self) -> None:
        """The master stops: no more workers, and no copy of the listener held open."""
        if self.forks is not None:
            for server in self.forks.alive():
                server.retire()
            self.forks.keep_orphan(None)

    def fork_servers_alive(self) -> bool:
        return self.forks is not None and bool(self.forks.alive())
