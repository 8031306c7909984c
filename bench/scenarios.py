"""The scenarios. Each is `async def NAME(name, template, o) -> dict` for one server, one run.

`o` holds the options from run.py (workers, log_dir, durations, rates). Times are seconds,
measured with time.monotonic() in this process unless a key says otherwise.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from typing import Any

import psutil
from harness import (
    MB,
    ListenerWatch,
    Server,
    boottime,
    cpu_seconds,
    kinds,
    pct,
    r3,
    start_ready,
    started_at,
    wait_workers,
)
from loadgen import Pool, get, open_loop, pid_of

HELLO = "apps.hello:app"
SLOW = "apps.slow:app"


# --- 1. throughput ---------------------------------------------------------------------


def _ms(token: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", token)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else None


async def _wrk(port: int, seconds: float, conns: int, latency: bool) -> str:
    args = [
        "wrk",
        "-t2",
        f"-c{conns}",
        f"-d{int(seconds)}s",
        "--timeout",
        "5s",
        *(["--latency"] if latency else []),
        f"http://127.0.0.1:{port}/",
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 20)
    except TimeoutError:
        proc.kill()  # our own child, by its handle
        await proc.wait()
        raise
    return out.decode(errors="replace")


def parse_wrk(out: str) -> dict[str, Any]:
    def num(pattern: str) -> str | None:
        m = re.search(pattern, out, re.M)
        return m.group(1) if m else None

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(map(int, errors.groups())) if errors else 0
    non2xx = int(num(r"Non-2xx or 3xx responses: (\d+)") or 0)
    return {
        "rps": float(num(r"Requests/sec:\s+([\d.]+)") or "nan"),
        "p50_ms": _ms(num(r"^\s+50%\s+(\S+)") or ""),
        "p99_ms": _ms(num(r"^\s+99%\s+(\S+)") or ""),
        "requests": int(num(r"(\d+) requests in") or 0),
        "errors": socket_errors + non2xx,
    }


async def _python_load(port: int, seconds: float, conns: int) -> dict[str, Any]:
    """Fallback without wrk: `conns` keep-alive clients in a closed loop for `seconds`."""
    lat: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        pool = Pool()
        while time.monotonic() < end:  # bounded by time; each request by its timeout
            r = await get(port, "/", 5.0, pool)
            if r["ok"]:
                lat.append((r["t1"] - r["t0"]) * 1e3)
            else:
                errors += 1
        pool.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(conns)))
    took = time.monotonic() - t0
    return {
        "rps": len(lat) / took,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "requests": len(lat) + errors,
        "errors": errors,
    }


async def measure_load(srv: Any, o: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A warm-up, then the measured load with the server tree's CPU: (warm-up, result)."""
    use_wrk = shutil.which("wrk") is not None
    if use_wrk:
        warm = parse_wrk(await _wrk(srv.port, o.warmup, o.conns, latency=False))
    else:
        warm = await _python_load(srv.port, o.warmup, o.conns)
    pids = [srv.pid, *srv.tree()]
    cpu0 = cpu_seconds(pids)
    if use_wrk:
        r = parse_wrk(await _wrk(srv.port, o.duration, o.conns, latency=True))
    else:
        r = await _python_load(srv.port, o.duration, o.conns)
    cpu = cpu_seconds(pids) - cpu0
    r["server_cpu_ms_per_1k"] = round(cpu * 1e6 / max(1, r["requests"]), 2)
    r["rps"] = round(r["rps"], 1)
    r["load_generator"] = "wrk" if use_wrk else "python"
    r["procs_measured"] = len(pids)
    return warm, r


async def throughput(name: str, template: str, o: Any) -> dict[str, Any]:
    srv, _ = await start_ready(name, template, o.app or HELLO, o)
    try:
        _, r = await measure_load(srv, o)
        return r
    finally:
        srv.stop()


# --- 2. reload under constant load ------------------------------------------------------


async def _reload(name: str, template: str, o: Any, keepalive: bool) -> dict[str, Any]:
    srv, ready = await start_ready(name, template, o.app or HELLO, o)
    try:
        old = set(ready["pids"])
        st: dict[str, float | None] = {"hup": None, "old_gone": None, "all_new": None}

        def hup() -> None:
            st["hup"] = srv.signal(signal.SIGHUP)

        async def watch(end: float) -> None:
            while time.monotonic() < end:  # bounded by the load's length
                if st["hup"] is not None and st["all_new"] is None:
                    live = srv.tree()
                    gone = not any(srv.alive(p) for p in old)
                    if gone and st["old_gone"] is None:
                        st["old_gone"] = time.monotonic()
                    new = [p for p in live if (srv.first_seen(p) or 0) >= st["hup"]]
                    if gone and len(new) >= o.workers:
                        st["all_new"] = time.monotonic()
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch(time.monotonic() + o.reload_duration + 6))
        results = await open_loop(
            srv.port, o.rate, o.reload_duration, keepalive, events={o.reload_at: hup}
        )
        await asyncio.sleep(0.1)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        t_hup = st["hup"] or 0.0
        served = sorted((r["t1"], pid_of(r)) for r in results if pid_of(r))
        new_served = [t for t, p in served if p not in old and t > t_hup]
        old_served = [t for t, p in served if p in old and t > t_hup]
        lat = [(r["t1"] - r["t0"]) * 1e3 for r in results if r["ok"]]
        span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
        return {
            "failed": sum(not r["ok"] for r in results),
            "total": len(results),
            "failures": kinds(results),
            "reload_s": r3(st["all_new"] - t_hup) if st["all_new"] else None,
            "old_gone_s": r3(st["old_gone"] - t_hup) if st["old_gone"] else None,
            "first_new_served_s": r3(new_served[0] - t_hup) if new_served else None,
            "last_old_served_s": r3(old_served[-1] - t_hup) if old_served else None,
            "p99_ms": r3(pct(lat, 99), 2),
            "max_ms": r3(max(lat), 2) if lat else None,
            "achieved_rps": round(len(results) / span, 1),
            "master_alive": srv.running(),
            "master_returncode": srv.proc.poll() if srv.proc else None,
        }
    finally:
        srv.stop()


async def reload(name: str, template: str, o: Any) -> dict[str, Any]:
    return await _reload(name, template, o, keepalive=False)


async def reload_keepalive(name: str, template: str, o: Any) -> dict[str, Any]:
    return await _reload(name, template, o, keepalive=True)


# --- 3. drain on SIGTERM with slow requests in flight -----------------------------------


async def drain(name: str, template: str, o: Any) -> dict[str, Any]:
    srv, _ = await start_ready(name, template, SLOW, o)
    try:
        srv.tree()
        slow = [
            asyncio.ensure_future(get(srv.port, f"/sleep?s={o.sleep}", o.sleep + 40))
            for _ in range(o.inflight)
        ]
        await asyncio.sleep(o.term_at)
        t_term = srv.signal(signal.SIGTERM)
        probes: list[asyncio.Task[dict[str, Any]]] = []
        exit_task = asyncio.ensure_future(srv.wait_exit(40.0))
        for _ in range(int(40.0 / o.probe_every)):  # bounded: 40 s at most
            if exit_task.done():
                break
            probes.append(asyncio.ensure_future(get(srv.port, "/pid", 2.0)))
            await asyncio.sleep(o.probe_every)
        t_exit = await exit_task
        await asyncio.sleep(0.5)  # let short-lived helpers (resource_tracker) go first
        orphans = [p for p in list(srv.known) if p != srv.pid and srv.alive(p)]
        done = await asyncio.gather(*slow)
        seen = await asyncio.gather(*probes)
        outcome = kinds(seen)
        refused = [r["t0"] - t_term for r in seen if r["outcome"] == "refused"]
        served = [r["t0"] - t_term for r in seen if r["ok"]]
        return {
            "completed": sum(r["ok"] for r in done),
            "inflight": len(done),
            "inflight_failures": kinds(done),
            "inflight_cut_at_s": r3(min(r["t1"] - t_term for r in done if not r["ok"]))
            if any(not r["ok"] for r in done)
            else None,
            "probes": len(seen),
            "new_ok": sum(r["ok"] for r in seen),
            "new_refused": outcome.get("refused", 0),
            "new_reset_or_timeout": sum(v for k, v in outcome.items() if k != "refused"),
            "new_outcomes": outcome,
            "last_new_ok_s": r3(max(served)) if served else None,
            "first_refused_s": r3(min(refused)) if refused else None,
            "exit_s": r3(t_exit - t_term) if t_exit else None,
            "exit_code": srv.proc.returncode if srv.proc else None,
            "orphans": len(orphans),
        }
    finally:
        srv.stop()


# --- 4. crash recovery -----------------------------------------------------------------


async def crash(name: str, template: str, o: Any) -> dict[str, Any]:
    srv, ready = await start_ready(name, template, o.app or HELLO, o)
    try:
        old = set(ready["pids"])
        before = {srv.pid, *srv.tree()}
        victim = min(old)
        st: dict[str, float] = {}
        watch = ListenerWatch(srv)

        def kill() -> None:
            st["boot"] = boottime()
            watch.start()
            st["t"] = srv.signal(signal.SIGKILL, victim)

        results = await open_loop(
            srv.port, o.crash_rate, o.crash_duration, events={o.kill_at: kill}
        )
        # a process that was not in the tree before and started after the kill
        starts = [started_at(p) for p in srv.tree() if p not in before]
        starts = [t for t in starts if t is not None and t >= st["boot"] - 0.01]
        new_served = sorted(
            r["t1"] for r in results if pid_of(r) and pid_of(r) not in old and r["t1"] > st["t"]
        )
        watch.join()
        return {
            "accepting_s": r3(watch.at - st["t"]) if watch.at else None,
            "serving_again_s": r3(new_served[0] - st["t"]) if new_served else None,
            "spawned_s": r3(max(0.0, min(starts) - st["boot"])) if starts else None,
            "failed": sum(not r["ok"] for r in results),
            "total": len(results),
            "failures": kinds(results),
            "failed_at_s": [r3(r["t0"] - st["t"]) for r in results if not r["ok"]][:20],
            "master_alive": srv.running(),
            "master_returncode": srv.proc.poll() if srv.proc else None,
        }
    finally:
        srv.stop()


# --- 5. time to ready, idle SIGTERM -> exit ---------------------------------------------


async def ready(name: str, template: str, o: Any) -> dict[str, Any]:
    srv = Server(name, template, o.app or HELLO, o.workers, o.log_dir).start()
    try:
        r = await wait_workers(srv, o.workers)
        if r["t_all"] is None:
            raise RuntimeError(f"{name} not ready; log tail:\n{srv.log_tail()}")
        await asyncio.sleep(0.3)  # idle: no probe in flight when SIGTERM arrives
        t_term = srv.signal(signal.SIGTERM)
        t_exit = await srv.wait_exit(30.0)
        return {
            "first_200_s": r3(r["t_first_200"]),
            "all_workers_s": r3(r["t_all"]),
            "idle_exit_s": r3(t_exit - t_term) if t_exit else None,
            "exit_code": srv.proc.returncode if srv.proc else None,
        }
    finally:
        srv.stop()


# --- 6. memory ---------------------------------------------------------------------------


async def rss(name: str, template: str, o: Any) -> dict[str, Any]:
    srv, ready_ = await start_ready(name, template, o.app or HELLO, o)
    try:
        workers = set(ready_["pids"])
        for _ in range(25):  # 200 requests
            rs = await asyncio.gather(*(get(srv.port, "/pid", 2.0) for _ in range(8)))
            workers |= {p for p in map(pid_of, rs) if p}
        await asyncio.sleep(o.settle)
        procs = []
        for pid in [srv.pid, *srv.tree()]:
            try:
                m = psutil.Process(pid).memory_full_info()
            except psutil.Error:
                continue
            role = "master" if pid == srv.pid else "worker" if pid in workers else "other"
            procs.append({"role": role, "rss": m.rss / MB, "pss": m.pss / MB, "uss": m.uss / MB})
        master = next(p for p in procs if p["role"] == "master")
        return {
            "master_rss_mb": r3(master["rss"], 1),
            "master_uss_mb": r3(master["uss"], 1),
            "total_rss_mb": r3(sum(p["rss"] for p in procs), 1),
            "total_pss_mb": r3(sum(p["pss"] for p in procs), 1),
            "total_uss_mb": r3(sum(p["uss"] for p in procs), 1),
            "procs": len(procs),
            "roles": [p["role"] for p in procs],
        }
    finally:
        srv.stop()
