"""SIGTERM with open SSE streams and WebSockets: how and when each one ends.

For each server: `--streams` (200) SSE streams (Starlette StreamingResponse) and as many
WebSockets on `--workers` (2) workers, then SIGTERM to the master. Reported: the time
from SIGTERM until every stream had ended, how each ended (SSE: clean = the chunked body's
last chunk then close; cut = EOF mid-body, what clients report as "incomplete chunked
read"; reset; WebSocket: its close code, or 1006 for none), and the master's exit time
and code. Each server has `--deadline` (45 s) to exit before the harness stops it.

    .venv/bin/python bench/streams_drain.py                      # every server, 1 round
    .venv/bin/python bench/streams_drain.py --servers asgi-supervise --rounds 3
    .venv/bin/python bench/streams_drain.py --out bench/results/streams-drain.json
    .venv/bin/python bench/streams_drain.py --reload --workers 4   # SIGHUP, streaming profile

`--reload` (asgi-supervise only): the `streaming` profile, `--streams` SSE clients that
reconnect when their stream ends (as EventSource does) and 50 short requests/s, then
SIGHUP: the reload's duration beside N x (boot + stream-drain-grace), how every ended
stream ended, where the reconnections landed, and failed short requests.

Goal (asgi-supervise): every stream closed cleanly within 1 s of the end of the drain
delay (0 s by default), exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "tests"))  # the stream clients

import harness  # noqa: E402
from streamclient import StreamClients  # noqa: E402

APP = "apps.streams:app"
SERVERS = {
    "asgi-supervise": "asgi-supervise {app} --workers {workers} --host {host} --port {port}"
    " --no-access-log",
    "uvicorn": "uvicorn {app} --workers {workers} --host {host} --port {port} --no-access-log",
    # uvicorn waits for streams without limit by default; with the same 15 s as ours:
    "uvicorn-timeout-15": "uvicorn {app} --workers {workers} --host {host} --port {port}"
    " --no-access-log --timeout-graceful-shutdown 15",
    "gunicorn-uvicorn-worker": "gunicorn {app} -k uvicorn_worker.UvicornWorker"
    " -w {workers} -b {host}:{port}",
    "granian": "granian {app} --interface asgi --workers {workers} --host {host} --port {port}"
    " --no-access-log",
}


def wait(predicate: Any, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def workers_serving(port: int, want: int, timeout: float) -> bool:
    import http.client

    seen: set[str] = set()

    def probe() -> bool:
        try:
            conn = http.client.HTTPConnection(harness.HOST, port, timeout=1)
            conn.request("GET", "/pid")
            seen.add(conn.getresponse().read().decode())
            conn.close()
        except OSError:
            pass
        return len(seen) >= want

    return wait(probe, timeout, 0.05)


def run_one(name: str, args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    server = harness.Server(name, SERVERS[name], APP, args.workers, log_dir).start()
    result: dict[str, Any] = {"server": name}
    clients = None
    try:
        if not workers_serving(server.port, args.workers, 60):
            return {**result, "error": "workers not serving", "log": server.log_tail()}
        clients = StreamClients(server.port)
        for _ in range(args.streams):
            clients.open_sse("/sse")
            clients.open_ws("/ws")
        total = 2 * args.streams
        if not wait(lambda: clients.open_count() == total, 60):
            return {**result, "error": f"only {clients.open_count()} of {total} open"}
        per_worker = sorted(clients.per_worker().values())
        t0 = server.signal(signal.SIGTERM)
        wait(clients.ended, args.deadline)
        exited = asyncio.run(server.wait_exit(max(0.1, args.deadline - (time.monotonic() - t0))))
        ends = [s.ended_at - t0 for s in clients.streams if s.ended_at is not None]
        sse = clients.outcomes("sse")
        ws = {("1006 (none)" if k == "None" else k): v for k, v in clients.outcomes("ws").items()}
        result.update(
            per_worker_at_sigterm=per_worker,
            all_closed_s=round(max(ends), 3) if len(ends) == total else None,
            sse=dict(sse),
            ws=ws,
            exit_s=round(exited - t0, 3) if exited else None,
            exit_code=server.proc.returncode if exited else "still running",
        )
        return result
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run_reload(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    import re

    from loadgen import Load

    template = (
        SERVERS["asgi-supervise"] + " --profile streaming --host {host} --no-metrics"
        " --log-format text"
    )
    server = harness.Server("asgi-supervise", template, APP, args.workers, log_dir).start()
    clients = None
    try:
        if not workers_serving(server.port, args.workers, 60):
            return {"error": "workers not serving", "log": server.log_tail()}
        old = set(server.tree())
        clients = StreamClients(server.port)
        streams = [clients.open_reconnecting_sse("/sse") for _ in range(args.streams)]
        if not wait(lambda: clients.open_count() == args.streams, 60):
            return {"error": f"only {clients.open_count()} of {args.streams} open"}
        with Load(server.port, rate=50, max_seconds=180) as load:
            load.wait_for_requests(25, timeout=30)
            t0 = server.signal(signal.SIGHUP)
            done = wait(lambda: "reload complete in" in read(server.log_path), 150)
            took = time.monotonic() - t0
            new = set(server.tree()) - old
            wait(lambda: clients.open_count() == args.streams, 30)
            stats = load.stop()
        log = read(server.log_path)
        boots = [float(x) for x in re.findall(r"ready in ([\d.]+)s", log)[args.workers :]]
        drains = [float(x) for x in re.findall(r"after draining ([\d.]+)s \(reload\)", log)]
        ended = [outcome for s in streams for _, outcome in s.history]
        on_new = sum(s.pid in new for s in streams)
        return {
            "workers": args.workers,
            "reload_s": round(took, 3) if done else None,
            "boot_s": boots,
            "old_worker_drain_s": drains,
            "n_x_boot_plus_grace_s": round(sum(boots) + 0.5 * args.workers, 3),
            "streams_ended": dict(Counter(ended)),
            "reconnected_streams_on_new_workers": f"{on_new}/{args.streams}",
            "short_requests": {"ok": stats.ok, "failed": stats.failed},
        }
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("asgi-supervise", "uvicorn", "gunicorn", "uvicorn-worker", "granian",
                    "starlette", "websockets"):  # fmt: skip
        try:
            versions[package] = version(package)
        except Exception:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--streams", type=int, default=200, help="SSE streams (and WebSockets)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=45.0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--reload", action="store_true", help="SIGHUP scenario (see above)")
    args = parser.parse_args(argv)
    if args.reload:
        with tempfile.TemporaryDirectory(prefix="streams-reload-") as log_dir:
            results = [run_reload(args, log_dir) for _ in range(args.rounds)]
        for result in results:
            print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"environment": environment(), "results": results}, f, indent=2)
        return 0
    names = [n for n in args.servers.split(",") if n]
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    installed = [n for n in names if shutil.which(SERVERS[n].split()[0], path=path)]
    for name in set(names) - set(installed):
        print(f"{name}: not installed, skipped", file=sys.stderr)
    names = installed
    results = []
    with tempfile.TemporaryDirectory(prefix="streams-drain-") as log_dir:
        for round_ in range(args.rounds):
            for name in names:
                result = {"round": round_ + 1, **run_one(name, args, log_dir)}
                results.append(result)
                print(json.dumps(result), flush=True)
    out = {
        "command": "bench/streams_drain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
