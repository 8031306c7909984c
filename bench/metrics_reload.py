"""Request metrics (overhead, `/metrics` scrapes under worker churn) and dev-reload latency.

Same contract as `scenarios.py`: `async def NAME(name, template, o) -> dict`, one server,
one run. `harness.Server` gives a server its own free metrics port when the template has
`{metrics_port}`; each scenario makes its temp directories (`{multiproc_dir}`, `{dir}`)
and removes them.

- `metrics`: the throughput scenario (wrk, CPU of the whole tree per request) for a server
  with or without request metrics, plus one scrape to show the metrics really counted.
- `scrape`: 8 workers, 51 route templates; time 50 scrapes of /metrics; recycle every
  worker with repeated SIGHUPs (`--reload-surge 4`) under traffic; scrape again, count the
  multiprocess directory's files and check the request counter against what was sent.
- `reload_latency`: with `--reload`, rewrite the app file and time the first response
  from the new code, polling every 10 ms; count the requests that failed meanwhile.

Every loop is bounded in count and in time; only processes the harness started are
signalled, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from typing import Any

from harness import (
    Server,
    kinds,
    median,
    pct,
    r3,
    spread,
    start_ready,
    wait_workers,
)
from loadgen import get, pid_of
from prometheus_client.parser import text_string_to_metric_families
from scenarios import HELLO, measure_load

ROUTES = "apps.routes:app"
N_ROUTES = 50
REQUESTS = "http_server_request_duration_seconds"


# --- /metrics --------------------------------------------------------------------------------


async def fetch_metrics(port: int, timeout: float = 10.0) -> dict[str, Any]:
    """One scrape on a new connection: wall time in ms, the body and outcome."""
    r = await get(port, "/metrics", timeout)
    return {
        "ms": (r["t1"] - r["t0"]) * 1e3,
        "ok": r["ok"],
        "outcome": r["outcome"],
        "body": (r["body"] or b"").decode(errors="replace"),
    }


def request_counts(text: str) -> dict[str, float]:
    """`http_server_request_duration_seconds_count`, summed per route label."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != REQUESTS:
            continue
        for sample in family.samples:
            if sample.name == REQUESTS + "_count":
                counts[sample.labels.get("http_route", "?")] += sample.value
    return dict(counts)


def supervisor_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def time_scrapes(port: int, n: int) -> dict[str, Any]:
    """`n` scrapes one after another (bounded: each by its 10 s timeout)."""
    runs = [await fetch_metrics(port) for _ in range(n)]
    ms = [r["ms"] for r in runs if r["ok"]]
    last = next((r["body"] for r in reversed(runs) if r["ok"]), "")
    return {
        "n": n,
        "failed": sum(not r["ok"] for r in runs),
        "median_ms": r3(median(ms), 2),
        "p95_ms": r3(pct(ms, 95), 2),
        "max_ms": r3(max(ms), 2) if ms else None,
        "bytes": len(last.encode()),
        "lines": sum(1 for line in last.splitlines() if line and not line.startswith("#")),
        "body": last,
    }


# --- 1. request-metrics overhead under wrk -----------------------------------------------------


async def metrics(name: str, template: str, o: Any) -> dict[str, Any]:
    """scenarios.throughput, with a metrics port, then one scrape as a sanity check."""
    srv, _ = await start_ready(name, template, HELLO, o)
    try:
        warm, r = await measure_load(srv, o)
        if "--metrics" in template:  # did the request metrics count? (sent once a second)
            await asyncio.sleep(1.5)
            assert srv.metrics_port is not None
            scraped = await fetch_metrics(srv.metrics_port)
            counts = request_counts(scraped["body"]) if scraped["ok"] else {}
            r["metrics_counted"] = int(sum(counts.values()))
            r["wrk_completed"] = warm["requests"] + r["requests"]
        return r
    finally:
        srv.stop()


# --- 2. /metrics with 8 workers x 51 routes, before and after ~1000 recycles -----------------


def _route_path(i: int, k: int) -> str:
    return f"/r{i % N_ROUTES}/{k}"


async def _burst(port: int, paths: list[str], conns: int) -> list[dict[str, Any]]:
    """Closed loop: `conns` at a time, a new connection per request, each bounded by 5 s."""
    sem = asyncio.Semaphore(conns)

    async def one(path: str) -> dict[str, Any]:
        async with sem:
            r = await get(port, path, 5.0)
            r["path"] = path
            return r

    return list(await asyncio.gather(*(one(p) for p in paths)))


async def _background(
    port: int, rate: float, stop: asyncio.Event, limit: int, out: list[dict[str, Any]]
) -> None:
    """Open loop at `rate` over all routes until `stop` (at most `limit` requests)."""
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    start = time.monotonic()
    for i in range(limit):
        if stop.is_set():
            break
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(get(port, _route_path(i, i), 5.0)))
    out.extend(await asyncio.gather(*tasks))


async def _cover(port: int, workers: set[int], requests: int) -> dict[str, Any]:
    """`requests` over the 50 routes (32 at a time), then top-ups of the routes some
    worker has not served yet, until every (worker, route) pair was seen: at most 5."""
    results: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    routes = [f"r{i}" for i in range(N_ROUTES)]
    want = {(p, route) for p in workers for route in routes}
    paths = [_route_path(i, i) for i in range(requests)]
    rps = None
    for attempt in range(6):
        t0 = time.monotonic()
        batch = await _burst(port, paths, 32)
        if attempt == 0:
            rps = round(len(batch) / (time.monotonic() - t0), 1)
        results += batch
        for r in batch:
            pid = pid_of(r)
            if pid:
                seen.add((pid, r["path"].split("/")[1]))
        missing = sorted({route for _, route in want - seen})
        if not missing:
            break
        paths = [f"/{route}/{k}" for route in missing for k in range(40)]
    return {
        "sent": len(results),
        "rps": rps,
        "coverage": f"{len(want & seen)}/{len(want)} (worker, route) pairs",
        "failed": kinds(results),
        "worker_share": sorted(Counter(map(pid_of, results)).values(), reverse=True),
        "other_pids": len({p for p, _ in seen} - workers),
    }


def _files(path: str) -> dict[str, Any]:
    """The metrics files in the master's private directory, made inside `path`."""
    private = [os.path.join(path, n) for n in os.listdir(path)]
    path = next((p for p in private if os.path.isdir(p)), path)
    names = sorted(n for n in os.listdir(path) if n.endswith(".db"))
    return {
        "files": len(names),
        "archived": [n for n in names if "archived" in n],
        "bytes": sum(os.path.getsize(os.path.join(path, n)) for n in names),
    }


async def _hup_until_replaced(srv: Server, timeout: float) -> tuple[int, float | None]:
    """SIGHUP once; wait until no pre-HUP worker is alive and the tree is full again.
    Returns (workers replaced, seconds) or (0, None) on timeout."""
    old = set(srv.tree())
    want = len(old)
    t = srv.signal(signal.SIGHUP)
    for _ in range(int(timeout / 0.02)):
        live = srv.tree()
        if not any(srv.alive(p) for p in old) and len(live) >= want:
            return want, time.monotonic() - t
        await asyncio.sleep(0.02)
    return 0, None


async def scrape(name: str, template: str, o: Any) -> dict[str, Any]:
    mdir = tempfile.mkdtemp(prefix="asgi-bench-multiproc-")
    srv = Server(name, template, ROUTES, o.scrape_workers, o.log_dir, multiproc_dir=mdir).start()
    mport = srv.metrics_port
    assert mport is not None
    res: dict[str, Any] = {"workers": o.scrape_workers, "multiproc_dir": mdir}
    try:
        ready = await wait_workers(srv, o.scrape_workers, timeout=60.0)
        if ready["t_all"] is None:
            raise RuntimeError(f"not ready: {ready['pids']}; log:\n{srv.log_tail()}")
        res["ready_s"] = r3(ready["t_all"])

        # Traffic over all 50 routes until every worker has served every route.
        cover = await _cover(srv.port, set(ready["pids"]), o.scrape_requests)
        sent = cover.pop("sent")
        res["warm"] = cover

        await asyncio.sleep(o.flush_wait)
        res["files_before"] = _files(mdir)
        before = await time_scrapes(mport, o.scrapes)
        body = before.pop("body")
        res["before"] = before
        counted = request_counts(body)
        res["routes_in_metrics"] = len(counted)
        res["counted_before"] = int(sum(v for k, v in counted.items() if k.startswith("/r")))
        res["sent_before"] = sent

        # Recycle: SIGHUP, wait for all 8 to be replaced, again; under open-loop traffic.
        stop = asyncio.Event()
        background: list[dict[str, Any]] = []
        limit = int(o.recycle_rate * (o.recycle_budget + 120))
        traffic = asyncio.ensure_future(
            _background(srv.port, o.recycle_rate, stop, limit, background)
        )
        recycled, hups, per_hup = 0, 0, []
        t_start = time.monotonic()
        deadline = t_start + o.recycle_budget
        while recycled < o.recycles and time.monotonic() < deadline:
            n, took = await _hup_until_replaced(srv, timeout=60.0)
            hups += 1
            if took is None:
                res["recycle_stuck"] = f"HUP {hups}: old workers not replaced in 60 s"
                break
            recycled += n
            per_hup.append(took)
        res["recycle_wall_s"] = round(time.monotonic() - t_start, 1)
        stop.set()
        await traffic
        res["hups"] = hups
        res["recycled"] = recycled
        res["per_hup_s"] = {"median": r3(median(per_hup)), "max": r3(max(per_hup, default=0))}
        res["recycles_per_s"] = round(recycled / max(1e-9, res["recycle_wall_s"]), 2)
        res["recycle_traffic"] = len(background)
        res["recycle_failed"] = sum(not r["ok"] for r in background)
        res["recycle_failures"] = kinds(background)
        res["processes_seen"] = len(srv.known)

        # Right after the recycling, then in the same steady state as before: every live
        # worker has served every route.
        await asyncio.sleep(o.flush_wait)
        res["files_recycled"] = _files(mdir)
        recycled_scrapes = await time_scrapes(mport, o.scrapes)
        recycled_scrapes.pop("body")
        res["after_recycling"] = recycled_scrapes
        cover = await _cover(srv.port, set(srv.tree()), o.scrape_requests)
        res["recycle_sent"] = len(background)
        res["cover_after_sent"] = cover.pop("sent")
        res["warm_after"] = cover

        await asyncio.sleep(o.flush_wait)
        res["files_after"] = _files(mdir)
        after = await time_scrapes(mport, o.scrapes)
        body = after.pop("body")
        res["after"] = after
        counted = request_counts(body)
        res["counted_after"] = int(sum(v for k, v in counted.items() if k.startswith("/r")))
        res["sent_total"] = sent + len(background) + res["cover_after_sent"]
        res["counter_matches"] = res["counted_after"] == res["sent_total"]
        res["reload_restarts_metric"] = supervisor_value(
            body, "asgi_supervise_worker_restarts_total", reason="reload"
        )
        res["reloads_metric"] = {  # by outcome; one per HUP if none overlapped
            outcome: supervisor_value(body, "asgi_supervise_reloads_total", outcome=outcome)
            for outcome in ("success", "failure", "completed", "aborted")
        }
        # the summary keys (medians of one run are the run's figures)
        res["scrape_before_median_ms"] = before["median_ms"]
        res["scrape_before_p95_ms"] = before["p95_ms"]
        res["scrape_recycled_median_ms"] = recycled_scrapes["median_ms"]
        res["scrape_after_median_ms"] = after["median_ms"]
        res["scrape_after_p95_ms"] = after["p95_ms"]
        res["files_before_n"] = res["files_before"]["files"]
        res["files_after_n"] = res["files_after"]["files"]
        return res
    finally:
        srv.stop()
        shutil.rmtree(mdir, ignore_errors=True)


# --- 3. save -> first response from the new code, with --reload --------------------------------

RELOAD_APP = '''"""Written by bench/metrics_reload.py: /version answers VERSION, /pid the pid."""

import os

VERSION = {version!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode() if scope["path"] == "/pid" else VERSION.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({{"type": "http.response.start", "status": 200, "headers": headers}})
    await send({{"type": "http.response.body", "body": body}})
'''
RELOAD_MODULE = "bench_reload_app"


def _write_app(directory: str, version: str) -> float:
    """Rewrite the app in place, as an editor's save does; returns when it was closed."""
    with open(os.path.join(directory, RELOAD_MODULE + ".py"), "w") as f:
        f.write(RELOAD_APP.format(version=version))
    return time.monotonic()


async def _one_save(srv: Server, directory: str, version: str, o: Any) -> dict[str, Any]:
    """Poll /version every 10 ms (a new connection each, not waiting for earlier answers),
    save, and stop polling `o.tail` s after the first answer with `version`."""
    polls: list[asyncio.Task[dict[str, Any]]] = []
    seen_new = asyncio.Event()

    def check(task: asyncio.Task[dict[str, Any]]) -> None:
        if not task.cancelled() and task.result()["body"] == version.encode():
            seen_new.set()

    async def poll(until: asyncio.Event) -> None:
        start = time.monotonic()
        for i in range(int(o.reload_timeout / o.poll_every) + 200):  # bounded in count
            if until.is_set():
                break
            await asyncio.sleep(max(0.0, start + i * o.poll_every - time.monotonic()))
            task = asyncio.ensure_future(get(srv.port, "/version", o.poll_timeout))
            task.add_done_callback(check)
            polls.append(task)

    done = asyncio.Event()
    poller = asyncio.ensure_future(poll(done))
    await asyncio.sleep(0.3)  # the old code answering
    t_save = _write_app(directory, version)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(seen_new.wait(), o.reload_timeout)
    await asyncio.sleep(o.tail)
    done.set()
    await poller
    results = await asyncio.gather(*polls)
    window = [r for r in results if r["t1"] >= t_save]  # answered (or failed) after the save
    new = [r for r in window if r["body"] == version.encode()]
    first_new = min((r["t1"] for r in new), default=None)
    old_after = [r for r in window if r["ok"] and first_new and r["t0"] > first_new]
    old_after = [r for r in old_after if r["body"] != version.encode()]
    lat = [(r["t1"] - r["t0"]) * 1e3 for r in window]
    return {
        "latency_s": r3(first_new - t_save) if first_new else None,
        "polls": len(window),
        "failed": sum(not r["ok"] for r in window),
        "failures": kinds(window),
        "slowest_poll_ms": r3(max(lat), 1) if lat else None,
        "polls_over_100ms": sum(x > 100 for x in lat),
        "old_code_after_first_new": len(old_after),
    }


async def reload_latency(name: str, template: str, o: Any) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="asgi-bench-reload-")
    _write_app(directory, "v0")
    old_env = os.environ.get("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale .pyc when a save keeps the mtime
    app = f"{RELOAD_MODULE}:app"
    try:
        srv = Server(name, template, app, 1, o.log_dir, dir=directory).start()
    finally:
        if old_env is None:
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        else:
            os.environ["PYTHONDONTWRITEBYTECODE"] = old_env
    try:
        ready = await wait_workers(srv, 1, timeout=30.0)
        if ready["t_all"] is None:
            raise RuntimeError(f"not ready; log:\n{srv.log_tail()}")
        saves = []
        for k in range(o.saves):
            await asyncio.sleep(o.save_gap)  # the previous reload settles
            saves.append(await _one_save(srv, directory, f"v{k + 1}-{os.urandom(3).hex()}", o))
        lat = [s["latency_s"] for s in saves if s["latency_s"] is not None]
        return {
            "saves": saves,
            "latency_s": [s["latency_s"] for s in saves],
            "median_latency_s": r3(median(lat)),
            "max_latency_s": r3(max(lat)) if lat else None,
            "missed": sum(s["latency_s"] is None for s in saves),
            "failed": sum(s["failed"] for s in saves),
            "total": sum(s["polls"] for s in saves),
            "failures": dict(sum((Counter(s["failures"]) for s in saves), Counter())),
            "slowest_poll_ms": max((s["slowest_poll_ms"] or 0) for s in saves),
            "polls_over_100ms": sum(s["polls_over_100ms"] for s in saves),
            "old_code_after_first_new": sum(s["old_code_after_first_new"] for s in saves),
            "master_alive": srv.running(),
        }
    finally:
        srv.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --- markdown beyond the median table ----------------------------------------------------------


def markdown_extra(variant: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    ok = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
    if variant == "metrics":
        on, off, nrm, uv = (
            "asgi-supervise+metrics",
            "asgi-supervise",
            "asgi-supervise+metrics-no-request",
            "uvicorn",
        )
        lines = ["median [min-max] per server:", ""]
        for s, rs in ok.items():
            lines.append(
                f"- {s}: rps {spread([r['rps'] for r in rs], 0)}, server CPU ms/1k "
                f"{spread([r['server_cpu_ms_per_1k'] for r in rs], 2)}"
                + (
                    f", metrics counted {[r.get('metrics_counted') for r in rs]} of wrk's "
                    f"{[r.get('wrk_completed') for r in rs]}"
                    if any("metrics_counted" in r for r in rs)
                    else ""
                )
            )

        def med(s: str, k: str) -> float | None:
            return median([r[k] for r in ok.get(s, [])])

        def paired(a: str, b: str, k: str) -> list[float]:
            """a/b within each round (runs[s][i] is round i), where both ran."""
            pairs = zip(runs.get(a, []), runs.get(b, []), strict=False)
            return [x[k] / y[k] for x, y in pairs if "error" not in x and "error" not in y]

        lines += ["", "ratio of medians; in brackets the median [min-max] of per-round ratios:", ""]
        for a, b, k, target in (
            (on, off, "rps", "target >= 0.97"),
            (nrm, off, "rps", ""),
            (on, uv, "server_cpu_ms_per_1k", "target <= 1.03"),
            (on, off, "server_cpu_ms_per_1k", ""),
            (off, uv, "server_cpu_ms_per_1k", ""),
        ):
            x, y = med(a, k), med(b, k)
            if x and y:
                rounds = spread(paired(a, b, k), 3)
                lines.append(f"- {k} {a} / {b}: {x / y:.3f} ({rounds}) {target}".rstrip())
        return [*lines, ""]
    if variant == "reload_latency":
        lines = []
        for s, rs in ok.items():
            lat = [x for r in rs for x in r["latency_s"] if x is not None]
            lines.append(
                f"- {s}: {len(lat)} saves, latency s median {r3(median(lat))}, max "
                f"{max(lat, default=None)}, all {[x for r in rs for x in r['latency_s']]}; "
                f"failed {sum(r['failed'] for r in rs)}/{sum(r['total'] for r in rs)} polls; "
                f"slowest poll {max(r['slowest_poll_ms'] for r in rs)} ms"
            )
        return [*lines, ""]
    if variant == "scrape":
        lines = []
        for s, rs in ok.items():
            for r in rs:
                lines.append(
                    f"- {s}: before {r['before']}, after {r['after']}; files "
                    f"{r['files_before']} -> {r['files_after']}; {r['hups']} SIGHUPs, "
                    f"{r['recycled']} workers recycled in {r['recycle_wall_s']} s; counter "
                    f"{r['counted_after']} vs sent {r['sent_total']}; {r['warm']['coverage']}, "
                    f"after {r['warm_after']['coverage']}"
                )
        return [*lines, ""]
    return []
