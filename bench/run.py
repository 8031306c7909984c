#!/usr/bin/env python3
"""asgi-supervise against uvicorn --workers, gunicorn + UvicornWorker and gunicorn's asgi
worker, in the same run, on 127.0.0.1.

    .venv/bin/python bench/run.py throughput            # one scenario
    .venv/bin/python bench/run.py all --rounds 2         # the suite (about 12 min)
    .venv/bin/python bench/run.py crash --servers asgi-supervise,uvicorn --quick

Scenarios: throughput, reload (new connection per request, then a keep-alive pool),
drain (default graceful timeout, then 1 s), crash, ready, rss; `all` runs them in that
order. `engines` runs throughput, reload_keepalive and crash on both engines
(asgi-supervise, asgi-supervise --engine gunicorn) and gunicorn + UvicornWorker. Three
more run their own fixed set of servers (not in `all`, `--servers` ignored):
`metrics` (request-metrics overhead under wrk), `scrape` (/metrics with 8 workers and 51
routes, before and after ~1000 recycles) and `reload-latency` (--reload: save -> first
response from the new code), from `metrics_reload.py`. Each round runs every server
once; the order alternates between rounds. Medians over rounds and ratios to uvicorn's
median go to bench/results/<stamp>-<what>.json (every run in full, rewritten after each
run) and a markdown summary next to it. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

import harness
import metrics_reload
import scenarios
from harness import BENCH, median

# {app} {host} {port} {workers}; `graceful` is the flag for a short graceful timeout.
SERVERS = {
    "asgi-supervise": (
        "asgi-supervise {app} --workers {workers} --host {host} --port {port} --no-access-log",
        "--graceful-timeout {g}",
    ),
    "uvicorn": (
        "uvicorn {app} --workers {workers} --host {host} --port {port} --no-access-log",
        "--timeout-graceful-shutdown {g}",
    ),
    "gunicorn-uvicorn-worker": (
        "gunicorn {app} -k uvicorn_worker.UvicornWorker -w {workers} -b {host}:{port}",
        "--graceful-timeout {g}",
    ),
    "gunicorn-asgi": (
        "gunicorn {app} --worker-class asgi -w {workers} -b {host}:{port}",
        "--graceful-timeout {g}",
    ),
    # Fork server (the default above) against exec'd workers and --preload, and gunicorn's
    # --preload: not in the default --servers.
    "asgi-supervise-exec": (
        "asgi-supervise {app} --workers {workers} --host {host} --port {port} --no-access-log"
        " --worker-start exec",
        "--graceful-timeout {g}",
    ),
    "asgi-supervise-preload": (
        "asgi-supervise {app} --workers {workers} --host {host} --port {port} --no-access-log"
        " --preload",
        "--graceful-timeout {g}",
    ),
    "gunicorn-uvicorn-worker-preload": (
        "gunicorn {app} -k uvicorn_worker.UvicornWorker -w {workers} -b {host}:{port} --preload",
        "--graceful-timeout {g}",
    ),
    "asgi-supervise-gunicorn": (  # gunicorn's arbiter, asgi-supervise's workers
        "asgi-supervise {app} --engine gunicorn --workers {workers} --host {host} --port {port}"
        " --no-access-log",
        "--graceful-timeout {g}",
    ),
}
DEFAULT_SERVERS = ["asgi-supervise", "uvicorn", "gunicorn-uvicorn-worker", "gunicorn-asgi"]
# `engines`: the two engines beside what they replace, gunicorn + UvicornWorker.
ENGINE_SERVERS = ["asgi-supervise", "asgi-supervise-gunicorn", "gunicorn-uvicorn-worker"]
# Servers of the issue-6/7 scenarios; {metrics_port}, {multiproc_dir}, {dir}: see
# metrics_reload.py. Not in the default --servers.
SUP = "asgi-supervise {app} --workers {workers} --host {host} --port {port} --no-access-log"
EXTRA_SERVERS = {
    "asgi-supervise+metrics": (SUP + " --metrics --metrics-port {metrics_port}", ""),
    "asgi-supervise+metrics-no-request": (
        SUP + " --metrics --no-request-metrics --metrics-port {metrics_port}",
        "",
    ),
    "asgi-supervise-8w-metrics": (
        SUP + " --metrics --metrics-port {metrics_port} --multiproc-dir {multiproc_dir}"
        " --reload-surge 4",
        "",
    ),
    "asgi-supervise-reload": (
        "asgi-supervise {app} --workers 1 --host {host} --port {port} --no-access-log"
        " --reload --reload-dir {dir} --app-dir {dir}",
        "",
    ),
    "uvicorn-reload": (
        "uvicorn {app} --host {host} --port {port} --no-access-log"
        " --reload --reload-dir {dir} --app-dir {dir}",
        "",
    ),
}
ALL_SERVERS = {**SERVERS, **EXTRA_SERVERS}
VARIANT_SERVERS = {  # variants that always run these servers, whatever --servers says
    "metrics": [
        "asgi-supervise+metrics",
        "asgi-supervise+metrics-no-request",
        "asgi-supervise",
        "uvicorn",
    ],
    "scrape": ["asgi-supervise-8w-metrics"],
    "reload_latency": ["asgi-supervise-reload", "uvicorn-reload"],
}
BASELINE = "uvicorn"
COUNTS = {
    "failed",
    "total",
    "errors",
    "completed",
    "new_ok",
    "new_refused",
    "new_reset_or_timeout",
    "orphans",
    "exit_code",
    "procs",
    "files_before_n",
    "files_after_n",
    "missed",
}  # no ratio for these

# variant -> (function, default rounds, short graceful timeout or None, summary keys)
VARIANTS: dict[str, tuple[Any, int, float | None, list[str]]] = {
    "throughput": (
        scenarios.throughput,
        3,
        None,
        ["rps", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_1k"],
    ),
    "reload": (
        scenarios.reload,
        2,
        None,
        ["failed", "total", "reload_s", "first_new_served_s", "p99_ms", "max_ms"],
    ),
    "reload_keepalive": (
        scenarios.reload_keepalive,
        2,
        None,
        ["failed", "total", "reload_s", "first_new_served_s", "p99_ms", "max_ms"],
    ),
    "drain": (
        scenarios.drain,
        2,
        None,
        [
            "completed",
            "new_ok",
            "new_refused",
            "new_reset_or_timeout",
            "last_new_ok_s",
            "first_refused_s",
            "exit_s",
            "orphans",
        ],
    ),
    "drain_graceful1": (
        scenarios.drain,
        2,
        1.0,
        [
            "completed",
            "inflight_cut_at_s",
            "new_refused",
            "new_reset_or_timeout",
            "exit_s",
            "exit_code",
        ],
    ),
    "crash": (
        scenarios.crash,
        3,
        None,
        ["accepting_s", "serving_again_s", "spawned_s", "failed", "total"],
    ),
    "ready": (scenarios.ready, 4, None, ["first_200_s", "all_workers_s", "idle_exit_s"]),
    "rss": (
        scenarios.rss,
        2,
        None,
        ["master_rss_mb", "master_uss_mb", "total_rss_mb", "total_pss_mb", "total_uss_mb", "procs"],
    ),
    "metrics": (
        metrics_reload.metrics,
        3,
        None,
        ["rps", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_1k"],
    ),
    "scrape": (
        metrics_reload.scrape,
        1,
        None,
        [
            "scrape_before_median_ms",
            "scrape_before_p95_ms",
            "files_before_n",
            "recycled",
            "scrape_recycled_median_ms",
            "scrape_after_median_ms",
            "scrape_after_p95_ms",
            "files_after_n",
        ],
    ),
    "reload_latency": (
        metrics_reload.reload_latency,
        2,
        None,
        ["median_latency_s", "max_latency_s", "missed", "failed", "total", "slowest_poll_ms"],
    ),
}
GROUPS = {
    "engines": ["throughput", "reload_keepalive", "crash"],  # --servers: ENGINE_SERVERS
    "reload": ["reload", "reload_keepalive"],
    "reload-latency": ["reload_latency"],
    "drain": ["drain", "drain_graceful1"],
    "all": [
        "throughput",
        "reload",
        "reload_keepalive",
        "drain",
        "drain_graceful1",
        "crash",
        "ready",
        "rss",
    ],
}
PACKAGES = [
    "asgi-supervise",
    "uvicorn",
    "uvicorn-worker",
    "gunicorn",
    "uvloop",
    "httptools",
    "h11",
    "websockets",
    "psutil",
    "pydantic",
]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def order(servers: list[str], rnd: int) -> list[str]:
    """Round 0 as given, round 1 reversed, then rotated by one every two rounds."""
    k = (rnd // 2) % len(servers)
    rotated = servers[k:] + servers[:k]
    return rotated[::-1] if rnd % 2 else rotated


def run_one(
    fn: Any, name: str, template: str, o: argparse.Namespace, timeout: float | None = None
) -> dict[str, Any]:
    t = time.monotonic()
    first_log = len(harness.LOGS)
    try:
        res = asyncio.run(asyncio.wait_for(fn(name, template, o), timeout or o.run_timeout))
    except Exception as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    res["wall_s"] = round(time.monotonic() - t, 2)
    res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # others' load on the machine
    res["logs"] = harness.LOGS[first_log:]
    return res


def summarize(runs: dict[str, list[dict[str, Any]]], keys: list[str]) -> dict[str, Any]:
    med = {
        s: {k: median([r.get(k) for r in rs if "error" not in r]) for k in keys}
        for s, rs in runs.items()
    }
    base = med.get(BASELINE, {})
    ratio = {
        s: {
            k: round(m[k] / base[k], 3)
            if m[k] is not None and base.get(k) and k not in COUNTS
            else None
            for k in keys
        }
        for s, m in med.items()
    }
    return {"median": med, "ratio_to_" + BASELINE: ratio}


def code_fingerprint() -> str:
    """sha256 over the installed asgi_supervise sources: which code a run measured (the
    package may be an editable install that changes between runs)."""
    import asgi_supervise

    root = os.path.dirname(asgi_supervise.__file__)
    digest = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith((".py", ".toml")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def compile_bytecode() -> str:
    """Compile asgi-supervise and the bench apps as an install from a wheel would have.

    An editable install leaves bytecode to the first import; with PYTHONDONTWRITEBYTECODE
    set (as on some machines) every interpreter of every run would compile our package from
    source, while the servers it is compared with were compiled by pip."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("asgi_supervise")
    dirs = [*(spec.submodule_search_locations or [])] if spec else []
    dirs.append(os.path.join(BENCH, "apps"))
    for directory in dirs:
        compileall.compile_dir(directory, quiet=1)
    return "compiled before the run: " + ", ".join(dirs)


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    wrk = None
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
        wrk = (out.stdout or out.stderr).splitlines()[0]
    commit = subprocess.run(
        ["git", "-C", BENCH, "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "wrk": wrk,
        "git": commit,
        "asgi_supervise_code": code_fingerprint(),
    }


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1000:
        v = int(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(out: dict[str, Any]) -> str:
    pin = out["options"].get("pin")
    lines = [
        f"# bench results {out['env']['date']}",
        "",
        f"rounds: {out['rounds']}; workers: {out['workers']}; "
        + (f"pinned with taskset (server:load CPUs): {pin}; " if pin else "")
        + f"cells are median (ratio to {BASELINE}'s median in this run)",
        "",
    ]
    for variant, v in out["variants"].items():
        servers = list(v["runs"])
        keys = VARIANTS[variant][3]
        lines += [
            f"## {variant}",
            "",
            "| figure | " + " | ".join(servers) + " |",
            "|---" * (len(servers) + 1) + "|",
        ]
        summary = summarize(v["runs"], keys)
        for k in keys:
            if k == "total" and "failed" in keys:
                continue
            if k == "failed" and "total" in keys:  # all rounds together, not a median
                cells = [
                    f"{sum(r.get('failed', 0) for r in v['runs'][s])}/"
                    f"{sum(r.get('total', 0) for r in v['runs'][s])}"
                    for s in servers
                ]
                lines.append("| failed/total (all rounds) | " + " | ".join(cells) + " |")
                continue
            cells = []
            for s in servers:
                m = summary["median"][s][k]
                ratio = summary["ratio_to_" + BASELINE][s][k]
                cells.append(
                    fmt(m) + (f" ({ratio:.2f}x)" if ratio is not None and s != BASELINE else "")
                )
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
        extra = [(s, i, r) for s in servers for i, r in enumerate(v["runs"][s])]
        notes = [
            f"- {s} run {i + 1}: error: {r['error'][:300]}" for s, i, r in extra if "error" in r
        ]
        for key in ("failures", "inflight_failures", "new_outcomes"):
            for s in servers:
                seen = [r.get(key) for r in v["runs"][s] if r.get(key)]
                if seen:
                    notes.append(f"- {s} {key} per run: {seen}")
        if notes:
            lines += [*notes, ""]
        lines += metrics_reload.markdown_extra(variant, v["runs"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "what",
        nargs="*",
        metavar="SCENARIO",
        help="all, " + ", ".join(dict.fromkeys([*GROUPS, *VARIANTS])),
    )
    p.add_argument("--report", metavar="JSON", help="only re-render the .md of a results file")
    p.add_argument("--rounds", type=int, help="rounds for every scenario (throughput >= 3)")
    p.add_argument(
        "--servers",
        help=f"comma-separated, of {', '.join(SERVERS)} (default: {', '.join(DEFAULT_SERVERS)};"
        f" for `engines` alone: {', '.join(ENGINE_SERVERS)})",
    )
    p.add_argument(
        "--app",
        help="the app of crash, ready, reload and rss (e.g. apps.heavy:app: ~100 MB at import)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 round, short loads: a smoke test")
    p.add_argument("--out", default=os.path.join(BENCH, "results"))
    p.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "asgi-bench-logs"))
    p.add_argument("--run-timeout", type=float, default=120.0)
    p.add_argument(
        "--pin",
        metavar="SERVER:LOAD",
        help="taskset CPU lists, e.g. 1:0: every server tree on SERVER, this harness and its "
        "load generator on LOAD, so that they do not take each other's CPU (2 cores: use "
        "with --workers 1)",
    )
    g = p.add_argument_group("load")
    g.add_argument("--duration", type=float, default=10.0, help="throughput wrk seconds")
    g.add_argument("--warmup", type=float, default=2.0)
    g.add_argument("--conns", type=int, default=64, help="throughput connections")
    g.add_argument("--rate", type=float, default=175.0, help="reload load, req/s")
    g.add_argument("--reload-duration", type=float, default=10.0)
    g.add_argument("--reload-at", type=float, default=2.5)
    g.add_argument("--inflight", type=int, default=20, help="drain: slow requests")
    g.add_argument("--sleep", type=float, default=3.0, help="drain: seconds each")
    g.add_argument("--term-at", type=float, default=0.5)
    g.add_argument("--probe-every", type=float, default=0.05)
    g.add_argument("--crash-rate", type=float, default=50.0)
    g.add_argument("--crash-duration", type=float, default=8.0)
    g.add_argument("--kill-at", type=float, default=2.5)
    g.add_argument("--settle", type=float, default=2.0)
    g = p.add_argument_group("scrape")
    g.add_argument("--scrape-workers", type=int, default=8)
    g.add_argument("--scrape-requests", type=int, default=4000, help="first traffic")
    g.add_argument("--scrapes", type=int, default=50, help="timed scrapes, before and after")
    g.add_argument("--flush-wait", type=float, default=1.5, help="workers flush once a second")
    g.add_argument("--recycles", type=int, default=1000, help="workers to replace (SIGHUPs)")
    g.add_argument("--recycle-budget", type=float, default=300.0, help="seconds at most")
    g.add_argument("--recycle-rate", type=float, default=100.0, help="req/s while recycling")
    g = p.add_argument_group("reload-latency")
    g.add_argument("--saves", type=int, default=3, help="saves per run")
    g.add_argument("--save-gap", type=float, default=1.5, help="seconds before each save")
    g.add_argument("--poll-every", type=float, default=0.01)
    g.add_argument("--poll-timeout", type=float, default=5.0)
    g.add_argument("--reload-timeout", type=float, default=15.0, help="per save, at most")
    g.add_argument("--tail", type=float, default=0.5, help="polling after the new code")
    g.add_argument(
        "--reload-delays",
        default="",
        help="comma-separated: also run asgi-supervise --reload --reload-delay S for each",
    )
    o = p.parse_args(argv)
    if o.report:
        with open(o.report) as f:
            out = json.load(f)
        text = markdown(out)
        with open(os.path.splitext(o.report)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
        return 0
    if not o.what or set(o.what) - set(VARIANTS) - set(GROUPS):
        p.error(f"name scenarios from: {', '.join(dict.fromkeys([*GROUPS, *VARIANTS]))}")
    if o.quick:
        o.rounds = o.rounds or 1
        o.duration, o.warmup, o.reload_duration, o.reload_at = 2, 1, 4, 1.0
        o.crash_duration, o.kill_at, o.settle = 4, 1.0, 0.5
        o.scrape_requests, o.scrapes, o.recycles, o.recycle_budget = 1000, 10, 40, 30.0
        o.saves = 2
    if o.pin:
        try:
            harness.pin(o.pin)
        except ValueError as exc:
            p.error(str(exc))
    default = ENGINE_SERVERS if o.what == ["engines"] else DEFAULT_SERVERS
    servers = o.servers.split(",") if o.servers else default
    unknown = set(servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; known: {', '.join(SERVERS)}")
    variants = list(dict.fromkeys(v for w in o.what for v in GROUPS.get(w, [w])))
    for delay in filter(None, o.reload_delays.split(",")):
        name = f"asgi-supervise-reload-delay{float(delay):g}"
        template = ALL_SERVERS["asgi-supervise-reload"][0] + f" --reload-delay {float(delay):g}"
        ALL_SERVERS[name] = (template, "")
        VARIANT_SERVERS["reload_latency"].append(name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(o.out, f"{stamp}-{'-'.join(o.what)}")
    os.makedirs(o.out, exist_ok=True)
    out: dict[str, Any] = {
        "env": {**environment(), "bytecode": compile_bytecode()},  # before any server starts
        "workers": o.workers,
        "rounds": {},
        "servers": {s: SERVERS[s][0] for s in servers},
        "options": vars(o),
        "variants": {},
    }
    t_suite = time.monotonic()
    for variant in variants:
        fn, default_rounds, graceful, keys = VARIANTS[variant]
        rounds = o.rounds or default_rounds
        if variant == "throughput" and not o.quick:
            rounds = max(3, rounds)
        out["rounds"][variant] = rounds
        these = VARIANT_SERVERS.get(variant, servers)
        for name in these:
            out["servers"].setdefault(name, ALL_SERVERS[name][0])
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in these}
        out["variants"][variant] = {"runs": runs}
        for rnd in range(rounds):
            for name in order(these, rnd):
                template, flag = ALL_SERVERS[name]
                if graceful is not None:
                    template += " " + flag.replace("{g}", f"{graceful:g}")
                timeout = o.run_timeout
                if variant == "scrape":  # the recycling alone may take --recycle-budget
                    timeout = max(timeout, o.recycle_budget + 240)
                res = run_one(fn, name, template, o, timeout)
                runs[name].append(res)
                brief = res.get("error", "")[:300] or json.dumps({k: res.get(k) for k in keys})
                log(f"[{variant} {rnd + 1}/{rounds}] {name}: {brief}")
                with open(base + ".json", "w") as f:
                    json.dump(out, f, indent=1, default=str)
                time.sleep(0.5)
        out["variants"][variant]["summary"] = summarize(runs, keys)
    out["suite_wall_s"] = round(time.monotonic() - t_suite, 1)
    out["asgi_supervise_code_at_end"] = code_fingerprint()
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(markdown(out))
    log(f"wrote {base}.json and {base}.md in {out['suite_wall_s']} s")
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
