#!/usr/bin/env python3
"""Request-metrics overhead (`--compare start`: workers forked from a fork server against
exec'd ones), with the servers loaded in turn, not one after another.

    .venv/bin/python bench/interleaved.py [--segment S] [--cycles N] [--pin SERVER:LOAD]
                                          [--header 'Name: value' ...] [--together]
                                          [--restart N] [--compare metrics|start]

`bench/run.py metrics` starts each server afresh for one 10 s load, so a pair of runs is
tens of seconds apart, and on this 2-vCPU VM the machine's speed drifts by more than the
3% being judged in that time. Here the four servers of that scenario run side by side,
each with one worker, all on the SERVER CPU (idle until loaded), and `wrk -t1 -c32` on
the LOAD CPU loads one at a time for S seconds, every server once per cycle, in an order
that rotates. Each cycle gives each server's requests/s and CPU per request (its whole
process tree); the ratios that matter are taken within a cycle, a few seconds apart, and
their median is reported with its spread. At the end, /metrics must have counted every
request wrk completed against the metrics-on server.

With --together, every cycle loads all four servers at once (four wrk, started in the
rotating order), so they share the SERVER CPU and any drift of the machine's speed hits
them alike. Each then gets about a quarter of the CPU, so CPU per request is the steady
figure: at saturation a server's throughput is the inverse of it. The once-a-second
costs (the master's ticks) weigh four times as much per request as they do alone.

With --restart N, the servers are started afresh every N cycles. A process keeps the
speed its start gave it (where its memory landed, its hash seed): two runs of the same
code differ by more than the 3% judged, and a run's median cannot average that out over
one set of processes. Fresh ones every cycle or two can.

Results: bench/results/<stamp>-interleaved.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from harness import BENCH, Server, cpu_seconds, median, spread, start_ready
from metrics_reload import fetch_metrics, request_counts
from run import compile_bytecode, environment
from scenarios import HELLO, parse_wrk

SUP = "asgi-supervise {app} --workers 1 --host {host} --port {port} --no-access-log"
UVICORN = "uvicorn {app} --workers 1 --host {host} --port {port} --no-access-log"
# --compare: the servers, and (numerator, denominator, figure, target) ratios to judge.
COMPARISONS: dict[str, tuple[dict[str, str], list[tuple[str, str, str, str]]]] = {
    # The request-metrics targets, and two controls.
    "metrics": (
        {
            "on": SUP + " --metrics --metrics-port {metrics_port}",
            "endpoint-only": SUP + " --metrics --no-request-metrics --metrics-port {metrics_port}",
            "off": SUP,
            "uvicorn": UVICORN,
        },
        [
            ("on", "off", "rps", ">= 0.97"),
            ("on", "uvicorn", "cpu_us", "<= 1.03"),
            ("on", "off", "cpu_us", ""),
            ("endpoint-only", "off", "rps", ""),
            ("off", "uvicorn", "cpu_us", ""),
        ],
    ),
    # Workers forked from a fork server (with and without --preload) against exec'd ones.
    "start": (
        {
            "fork": SUP,
            "exec": SUP + " --worker-start exec",
            "preload": SUP + " --preload",
            "uvicorn": UVICORN,
        },
        [
            ("fork", "exec", "rps", "0.97-1.03"),
            ("fork", "exec", "cpu_us", "0.97-1.03"),
            ("preload", "exec", "rps", "0.97-1.03"),
            ("preload", "exec", "cpu_us", "0.97-1.03"),
            ("fork", "uvicorn", "cpu_us", ""),
        ],
    ),
}


HEADERS: list[str] = []  # --header: sent with every request


async def load(port: int, seconds: int) -> dict[str, Any]:
    """wrk on this process's CPUs (main() pins it to LOAD)."""
    headers = [a for h in HEADERS for a in ("-H", h)]
    args = ["wrk", "-t1", "-c32", *headers, f"-d{seconds}s", f"http://{harness.HOST}:{port}/"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 20)
    return parse_wrk(out.decode(errors="replace"))


async def segment(srv: Server, seconds: int) -> dict[str, Any]:
    """One load of one server: requests/s, and its tree's CPU microseconds per request."""
    pids = [srv.pid, *srv.tree()]
    before = cpu_seconds(pids)
    r = await load(srv.port, seconds)
    cpu = cpu_seconds(pids) - before
    return {"rps": r["rps"], "requests": r["requests"], "errors": r["errors"],
            "cpu_us": cpu * 1e6 / max(1, r["requests"])}  # fmt: skip


def rotated(names: list[str], cycle: int) -> list[str]:
    """As given, then reversed, then rotated by one every two cycles (as run.py orders)."""
    k = (cycle // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if cycle % 2 else order


async def counted(port: int) -> float | None:
    scraped = await fetch_metrics(port)
    return sum(request_counts(scraped["body"]).values()) if scraped["ok"] else None


async def start(o: argparse.Namespace) -> dict[str, Server]:
    """The four servers, answering and warmed up (each loaded 2 s, not measured)."""
    servers: dict[str, Server] = {}
    try:
        for name, template in COMPARISONS[o.compare][0].items():
            servers[name], _ = await start_ready(name, template, HELLO, o)
        warm_ups = [load(srv.port, 2) for srv in servers.values()]
        if o.together:
            await asyncio.gather(*warm_ups)
        else:
            for warm_up in warm_ups:
                await warm_up
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


async def measure(o: argparse.Namespace) -> dict[str, Any]:
    """The cycles, on servers started afresh every --restart cycles (0: once)."""
    cycles: list[dict[str, dict[str, Any]]] = []
    counted_total: float | None = 0.0
    batch = o.restart or o.cycles
    for first in range(0, o.cycles, batch):
        servers = await start(o)
        on_metrics = servers["on"].metrics_port if "on" in servers else None
        try:
            before = after = None
            if on_metrics is not None:
                await asyncio.sleep(o.flush_wait)  # workers deliver their counts once a second
                before = await counted(on_metrics)
            for cycle in range(first, min(first + batch, o.cycles)):
                order = rotated(list(servers), cycle)
                if o.together:  # all at once, wrk started in this order: they share the CPU
                    loads = [segment(servers[name], o.segment) for name in order]
                    results = dict(zip(order, await asyncio.gather(*loads), strict=True))
                else:
                    results = {name: await segment(servers[name], o.segment) for name in order}
                cycles.append(results)
                brief = ", ".join(f"{n} {r['rps']:.0f}/s" for n, r in results.items())
                print(f"[cycle {cycle + 1}/{o.cycles}] {brief}", file=sys.stderr, flush=True)
            if on_metrics is not None:
                await asyncio.sleep(o.flush_wait)
                after = await counted(on_metrics)
        finally:
            for srv in servers.values():
                srv.stop()
        if counted_total is not None and before is not None and after is not None:
            counted_total += after - before
        else:
            counted_total = None
    return {
        "cycles": cycles,
        "metrics_counted": counted_total,
        "wrk_completed": sum(c["on"]["requests"] for c in cycles if "on" in c),
    }


def markdown(out: dict[str, Any]) -> str:
    o, cycles = out["options"], out["result"]["cycles"]
    servers, ratios_judged = COMPARISONS[o.get("compare", "metrics")]
    names = list(servers)
    lines = [
        f"# {o.get('compare', 'metrics')}, interleaved: {out['env']['date']}",
        "",
        f"`{out['command']}`: {len(cycles)} cycles of {o['segment']} s per server"
        + (", all servers loaded at once" if o.get("together") else ", one after another")
        + (f", servers started afresh every {o['restart']} cycles" if o.get("restart") else "")
        + f"; servers on CPU {o['server_cpus']}, wrk -t1 -c32 on CPU {o['load_cpus']}"
        + (f", every request with {', '.join(o['header'])}." if o.get("header") else "."),
        "",
        "| server | command | rps, median [min-max] | CPU us/request, median [min-max] |",
        "|---|---|---|---|",
    ]
    for n in names:
        rps = [c[n]["rps"] for c in cycles]
        cpu = [c[n]["cpu_us"] for c in cycles]
        lines.append(
            f"| {n} | `{servers[n]}` | {median(rps):,.0f} [{min(rps):,.0f}-{max(rps):,.0f}] "
            f"| {median(cpu):.2f} [{min(cpu):.2f}-{max(cpu):.2f}] |"
        )
    lines += ["", "| ratio, within each cycle | median [min-max] | target |", "|---|---|---|"]
    for a, b, k, target in ratios_judged:
        ratios = [c[a][k] / c[b][k] for c in cycles]
        lines.append(f"| {k} {a} / {b} | {spread(ratios, 3)} | {target} |")
    if o.get("together"):  # at saturation, throughput is CPU per request inverted
        a, b, _, _ = ratios_judged[0]
        ratios = [c[b]["cpu_us"] / c[a]["cpu_us"] for c in cycles]
        lines.append(f"| throughput at equal CPU, {a} / {b} | {spread(ratios, 3)} | >= 0.97 |")
    r = out["result"]
    errors = sum(c[n]["errors"] for c in cycles for n in names)
    lines += ["", f"- wrk errors (socket errors and non-2xx), all servers: {errors}"]
    if "on" in servers:
        lines.append(
            f"- requests the metrics-on server's /metrics counted over the cycles: "
            f"{r['metrics_counted']}; wrk completed {r['wrk_completed']} (wrk does not count "
            "the requests in flight when each load stops, up to 32)"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--segment", type=int, default=3, help="seconds of load per server per cycle")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--pin", default="1:0", metavar="SERVER:LOAD", help="taskset CPU lists")
    p.add_argument(
        "--together",
        action="store_true",
        help="load all servers at once each cycle: they share the SERVER CPU",
    )
    p.add_argument(
        "--restart",
        type=int,
        default=0,
        metavar="N",
        help="start the servers afresh every N cycles (0: once): a process keeps the speed "
        "its start gave it, so fresh ones average that luck out",
    )
    p.add_argument(
        "--compare",
        choices=sorted(COMPARISONS),
        default="metrics",
        help="metrics: request metrics on, endpoint only, off, uvicorn; start: forked "
        "workers (with and without --preload) against exec'd ones, and uvicorn",
    )
    p.add_argument("--flush-wait", type=float, default=1.5)
    p.add_argument(
        "--header",
        action="append",
        default=[],
        help="a request header for wrk, e.g. 'X-Forwarded-For: 198.51.100.7' (repeatable)",
    )
    p.add_argument("--out", default=os.path.join(BENCH, "results"))
    o = p.parse_args(argv)
    if shutil.which("wrk") is None:
        p.error("needs wrk (apt-get install wrk)")
    try:
        o.server_cpus, o.load_cpus = harness.pin(o.pin)
    except ValueError as exc:
        p.error(str(exc))
    HEADERS.extend(o.header)
    o.workers, o.log_dir = 1, tempfile.mkdtemp(prefix="asgi-bench-interleaved-")
    bytecode = compile_bytecode()
    result = asyncio.run(measure(o))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(o.out, f"{stamp}-interleaved")
    command = "bench/interleaved.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {**environment(), "bytecode": bytecode}
    out = {"env": env, "command": command.strip(), "options": vars(o), "result": result}
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    text = markdown(out)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {base}.json and {base}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
