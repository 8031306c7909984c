"""Chaos: a worker SIGKILLed every few seconds under keep-alive load, three servers.

    .venv/bin/python bench/chaos.py                  # 60 s per server, ~4 min in all
    .venv/bin/python bench/chaos.py --seconds 15     # a quick check, ~1.5 min
    .venv/bin/python bench/chaos.py --servers asgi-supervise --seconds 20

Each server runs `apps.hello:app` with 2 workers on 127.0.0.1, one server after the other
in the same run: asgi-supervise, `uvicorn --workers 2`, and
`gunicorn -k uvicorn_worker.UvicornWorker -w 2`. Once both workers answer, for
`--seconds`: `--clients` (8) keep-alive clients send `--rate` (200) requests/s in all to
`/pid`, each client one request at a time on its own connection (5 s timeout, paced, a
connection the server closed while idle is not reused); every `--every` (3) s a random
live worker (seeded, `--seed`) gets SIGKILL. A thread samples the server's process tree
every 20 ms. Then the load stops, the master gets SIGTERM (up to 40 s to exit), and every
process ever seen in its tree must be gone; the bench SIGKILLs what is left, by pid.

Figures per server:
- `success_pct`, `ok`, `failed`, `failures` by kind (`refused`, `reset`, `eof`,
  `stale_keepalive` = a reused connection dead before any byte of a response, `timeout`);
  `success_with_retry_pct`: the same requests when a client retries a `stale_keepalive`
  once on a new connection, as Go's net/http and browsers do for idempotent requests
  (measured: the retry is sent; `retry_failures` by kind);
  `sent` vs `target` (a client waits for its answer, so a hang shows as fewer requests
  sent as well as in `max_latency_s`);
- `zero_serving_max_s` / `_total_s`: the longest / summed time during which no live
  worker had answered yet (a worker serves from its first answer: with 200 req/s that is
  within milliseconds of being ready), so clients could only wait; `zero_process_max_s`:
  no worker process at all; `boot_s`: one boot, from the server's start to its first
  answer (measured before the chaos); goal: `zero_serving_max_s` never above it
  (`zero_within_one_boot`); `replacement_first_answer_s_median`: a new worker first seen
  -> its first answer (an upper bound of its boot: keep-alive clients stay where they are);
- `master_alive` after the chaos, `exit_code` and `exit_s` after SIGTERM, `leftovers`.

Output: bench/results/<stamp>-chaos.json (summary only) and a markdown table on stdout;
server logs in --log-dir.
Only processes this bench started are signalled, by pid (see harness.Server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import harness
import psutil

SERVERS = {
    "asgi-supervise": "asgi-supervise {app} --workers {workers} --host {host} --port {port}"
    " --no-access-log",
    "uvicorn": "uvicorn {app} --workers {workers} --host {host} --port {port} --no-access-log",
    "gunicorn-uvicorn-worker": "gunicorn {app} -k uvicorn_worker.UvicornWorker -w {workers}"
    " -b {host}:{port}",
}
SAMPLE = 0.02  # seconds between samples of the process tree


def is_worker(name: str, proc: psutil.Process) -> bool:
    """A worker of `name`'s master, by its command line (uvicorn also runs a resource tracker)."""
    if name.startswith("gunicorn"):
        return True  # forks of the master, nothing else
    cmdline = " ".join(proc.cmdline())
    if name == "uvicorn":
        return "spawn_main" in cmdline
    return "asgi_supervise.worker" in cmdline


def workers(srv: harness.Server) -> list[int]:
    found = []
    try:
        children = psutil.Process(srv.pid).children()
    except psutil.Error:
        return []
    srv.remember([c.pid for c in children])
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and is_worker(srv.name, child):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


@dataclass
class Sampler:
    """The server's live workers every SAMPLE s, on a thread of its own."""

    srv: harness.Server
    samples: list[tuple[float, frozenset[int]]] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            live = frozenset(workers(self.srv))
            for pid in live:
                self.first_seen.setdefault(pid, now)
            self.samples.append((now, live))
            self.stop.wait(SAMPLE)


async def client(
    port: int,
    interval: float,
    offset: float,
    until: float,
    results: list[dict[str, Any]],
    retries: list[dict[str, Any]],
) -> None:
    pool = harness.Pool()
    next_at = time.monotonic() + offset
    await asyncio.sleep(offset)
    while time.monotonic() < until:
        result = await harness.get(port, "/pid", timeout=5.0, pool=pool)
        results.append(result)
        if result["outcome"] == "stale_keepalive":  # what Go's net/http, browsers do
            retries.append(await harness.get(port, "/pid", timeout=5.0, pool=pool))
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    pool.close()


async def chaos(
    srv: harness.Server, o: argparse.Namespace, rng: random.Random, boot: float | None
) -> dict:
    sampler = Sampler(srv)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    results: list[dict[str, Any]] = []
    retries: list[dict[str, Any]] = []
    kills: list[tuple[float, int]] = []
    start = time.monotonic()
    until = start + o.seconds
    interval = o.clients / o.rate
    # Clients spread over the interval, kills at a random point of it: neither lines up
    # with the other (all clients and the kill on one tick would make every kill race).
    load = [
        asyncio.ensure_future(
            client(srv.port, interval, i * interval / o.clients, until, results, retries)
        )
        for i in range(o.clients)
    ]
    next_kill = start + o.every
    while next_kill < until:
        await asyncio.sleep(max(0.0, next_kill + rng.uniform(0, interval) - time.monotonic()))
        live = workers(srv)
        if live:
            victim = rng.choice(sorted(live))
            with contextlib.suppress(RuntimeError, ProcessLookupError):
                kills.append((srv.signal(signal.SIGKILL, victim), victim))
        next_kill += o.every
    await asyncio.gather(*load)
    end = time.monotonic()
    master_alive = srv.running()
    sampler.stop.set()
    thread.join(5)
    row = figures(srv, o, sampler, results, kills, start, end, master_alive, boot)
    retried_ok = sum(r["ok"] for r in retries)
    row["success_with_retry_pct"] = round(100 * (row["ok"] + retried_ok) / len(results), 3)
    row["retry_failures"] = harness.kinds(retries)
    return row


def runs(flags: list[tuple[float, bool]], end: float) -> list[float]:
    """Durations of the stretches where the flag was True, from samples (t, flag)."""
    stretches, since = [], None
    for t, flag in flags:
        if flag and since is None:
            since = t
        elif not flag and since is not None:
            stretches.append(t - since)
            since = None
    if since is not None:
        stretches.append(end - since)
    return stretches


def figures(srv, o, sampler, results, kills, start, end, master_alive, boot) -> dict[str, Any]:
    first_served: dict[int, float] = {}
    for r in sorted(results, key=lambda r: r["t1"]):
        pid = harness.pid_of(r)
        if pid is not None:
            first_served.setdefault(pid, r["t1"])
    window = [(t, live) for t, live in sampler.samples if start <= t <= end]
    no_serving = [
        (t, not any(first_served.get(pid, float("inf")) <= t for pid in live)) for t, live in window
    ]
    no_process = [(t, not live) for t, live in window]
    zero_serving = runs(no_serving, end)
    zero_process = runs(no_process, end)
    answered = [
        first_served[pid] - seen
        for pid, seen in sampler.first_seen.items()
        if seen > start and pid in first_served
    ]
    ok = sum(r["ok"] for r in results)
    failures = harness.kinds(results)
    latencies = [r["t1"] - r["t0"] for r in results]
    zero_max = max(zero_serving, default=0.0)
    return {
        "server": srv.name,
        "target": int(o.rate * o.seconds),
        "sent": len(results),
        "ok": ok,
        "failed": len(results) - ok,
        "success_pct": round(100 * ok / len(results), 3) if results else None,
        "failures": failures,
        "kills": len(kills),
        "boot_s": harness.r3(boot),
        "replacements_answered": len(answered),
        "replacement_first_answer_s_median": harness.r3(harness.median(answered)),
        "zero_serving_max_s": round(zero_max, 3),
        "zero_serving_total_s": round(sum(zero_serving), 3),
        "zero_process_max_s": round(max(zero_process, default=0.0), 3),
        "zero_within_one_boot": boot is not None and zero_max <= boot,
        "max_latency_s": harness.r3(max(latencies, default=None)),
        "p99_latency_ms": harness.r3(1000 * (harness.pct(latencies, 99) or 0), 1),
        "master_alive": master_alive,
    }


def stop(srv: harness.Server) -> dict[str, Any]:
    """SIGTERM, then every process ever seen in the tree must be gone (SIGKILL stragglers)."""
    srv.tree()
    sent = srv.signal(signal.SIGTERM)
    assert srv.proc is not None
    try:
        code = srv.proc.wait(40)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - sent
    deadline = time.monotonic() + 5
    with srv.lock:
        known = [pid for pid in srv.known if pid != srv.pid]
    left = [pid for pid in known if srv.alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if srv.alive(pid)]
    srv.stop()  # SIGKILLs the master if it still runs, and what is left, by pid
    return {"exit_code": code, "exit_s": round(took, 3), "leftovers": len(left)}


async def main_async(o: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(o.seed)
    out = []
    for name in o.servers:
        opts = SimpleNamespace(workers=2, log_dir=o.log_dir)
        print(f"# {name}: starting", file=sys.stderr, flush=True)
        srv, ready = await harness.start_ready(name, SERVERS[name], "apps.hello:app", opts)
        try:
            row = await chaos(srv, o, rng, ready["t_first_200"])
        finally:
            row_stop = stop(srv)
        row.update(row_stop)
        print(f"# {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        out.append(row)
    return out


COLUMNS = [
    ("server", "server"),
    ("success_pct", "success %"),
    ("success_with_retry_pct", "with 1 retry of stale keep-alive, %"),
    ("failed", "failed / sent"),
    ("failures", "failures by kind"),
    ("kills", "kills"),
    ("zero_serving_max_s", "longest 0 serving, s"),
    ("zero_serving_total_s", "total 0 serving, s"),
    ("boot_s", "one boot, s"),
    ("max_latency_s", "max latency, s"),
    ("master_alive", "master alive"),
    ("exit_code", "exit after TERM (s)"),
    ("leftovers", "left after TERM"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = {
            **r,
            "failed": f"{r['failed']} / {r['sent']}",
            "failures": ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "-",
            "exit_code": f"{r['exit_code']} ({r['exit_s']})",
        }
        lines.append("| " + " | ".join(str(cells[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s, all clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between SIGKILLs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--out", default=os.path.join(harness.BENCH, "results"))
    parser.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "asgi-bench-logs"))
    o = parser.parse_args(argv)
    o.servers = o.servers.split(",")
    unknown = set(o.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    load_before = os.getloadavg()
    rows = asyncio.run(main_async(o))
    result = {
        "scenario": "chaos",
        "stamp": stamp,
        "command": "bench/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(o, k) for k in ("seconds", "rate", "clients", "every", "seed")},
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "python": sys.version.split()[0],
            # Other work on the machine widens the keep-alive race (the client's loop sees
            # a dead connection's FIN later): load averages before and after the run.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "versions": {
                p: version(p) for p in ("asgi-supervise", "uvicorn", "gunicorn", "uvicorn-worker")
            },
        },
        "servers": rows,
    }
    os.makedirs(o.out, exist_ok=True)
    path = os.path.join(o.out, f"{stamp}-chaos.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(rows))
    print(f"\n{path}", file=sys.stderr)
    return 0 if all(r["master_alive"] and not r["leftovers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
