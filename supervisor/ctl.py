"""`asgi-supervise status | reload | scale | stop | config --running`: the client side of
the master's control socket (`master/control.py`).

Which master: ``--socket PATH``, else ``--pid-file PATH`` (its ``.sock`` sibling), else
``ASGI_SUPERVISE_CONTROL_SOCKET`` / ``ASGI_SUPERVISE_PID_FILE``, else the one master of
this user found in the runtime directory.

Exit codes: 0 done; 1 the command failed (a reload aborted, a refusal); 2 usage error;
4 no master to talk to (no socket, or nobody listening).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from asgi_supervise import logs
from asgi_supervise.master.control import path_for_pid_file, runtime_dir

NO_MASTER = 4
FAILED = 1


class NoMaster(Exception):
    """Nothing to talk to: printed as one line, exit code 4."""


def find_socket(args: argparse.Namespace, environ: dict[str, str] | os._Environ) -> str:
    if args.socket:
        return args.socket
    if args.pid_file:
        return path_for_pid_file(args.pid_file)
    if environ.get("ASGI_SUPERVISE_CONTROL_SOCKET"):
        return environ["ASGI_SUPERVISE_CONTROL_SOCKET"]
    if environ.get("ASGI_SUPERVISE_PID_FILE"):
        return path_for_pid_file(environ["ASGI_SUPERVISE_PID_FILE"])
    directory = runtime_dir()
    found = []
    for path in sorted(directory.glob("master-*.sock")):
        pid = path.stem.removeprefix("master-")
        if pid.isdigit() and _alive(int(pid)):
            found.append(str(path))
    if len(found) == 1:
        return found[0]
    if not found:
        raise NoMaster(
            f"no running master found in {directory}: pass --socket PATH or --pid-file PATH"
        )
    raise NoMaster(f"{len(found)} masters running ({', '.join(found)}): pass --socket PATH")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def request(path: str, message: dict[str, Any], timeout: float | None = 10.0) -> Any:
    """One request, one answer; the answer's `result`, or ControlFailed with its error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise NoMaster(f"{path}: no such control socket (is the master running?)") from None
    except ConnectionRefusedError:
        sock.close()
        raise NoMaster(f"{path}: nobody listening (the master is gone)") from None
    except PermissionError:
        sock.close()
        owner = _owner(path)
        raise ControlFailed(
            f"{path}: permission denied: the control socket belongs to {owner}"
        ) from None
    with sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        reader = sock.makefile("rb")
        line = reader.readline()
        if not line:
            raise ControlFailed(f"{path}: the master closed the connection without an answer")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ControlFailed(answer.get("error") or "refused")
        if message["command"] == "stop":
            sock.settimeout(None)  # the master closes it as it exits
            reader.read()
        return answer["result"]


def _owner(path: str) -> str:
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class ControlFailed(Exception):
    """The master refused, or the command failed: one line, exit code 1."""


# --- the commands ---------------------------------------------------------------------


def build_parser(command: str) -> argparse.ArgumentParser:
    from asgi_supervise.cli import Parser

    descriptions = {
        "status": "The running master's workers, plan and last reload (like `pm2 list`).",
        "reload": "Rolling reload of the running master; waits and reports the outcome.",
        "scale": "Set the running master's worker count: N, +N or -N.",
        "stop": "Drain the running master (or --now) and wait until it has exited.",
        "config": "The settings the running master uses, with their sources.",
    }
    parser = Parser(
        prog=f"asgi-supervise {command}" + (" --running" if command == "config" else ""),
        description=descriptions.get(command),
        allow_abbrev=False,
    )
    where = parser.add_argument_group("which master")
    where.add_argument("--socket", help="the master's control socket")
    where.add_argument("--pid-file", help="the master's pid file (its socket is beside it)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "status":
        parser.add_argument(
            "--watch",
            nargs="?",
            const=1.0,
            type=float,
            metavar="SECONDS",
            help="refresh in place every SECONDS (default 1) until Ctrl-C",
        )
    if command == "reload":
        parser.add_argument(
            "--timeout",
            type=float,
            default=None,
            help="give up waiting after SECONDS (the reload goes on); default: wait",
        )
    if command == "scale":
        parser.add_argument("workers", help="N, +N or -N")
    if command == "stop":
        parser.add_argument(
            "--now", action="store_true", help="stop now: in-flight requests are cut (SIGQUIT)"
        )
    return parser


def main(command: str, argv: list[str]) -> int:
    if command == "scale":  # `scale -1` is a number, not a flag
        argv = [a if not (a[:1] == "-" and a[1:].isdigit()) else f"={a}" for a in argv]
    args = build_parser(command).parse_args(argv)
    if command == "scale":
        args.workers = args.workers.removeprefix("=")
    try:
        path = find_socket(args, os.environ)
        return COMMAND[command](path, args)
    except NoMaster as exc:
        logs.say(str(exc))
        return NO_MASTER
    except ControlFailed as exc:
        logs.say(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return FAILED


def status(path: str, args: argparse.Namespace) -> int:
    if args.watch is None:
        data = request(path, {"command": "status"})
        logs.emit(json.dumps(data, indent=2) if args.json else render_status(data))
        return 0
    try:
        while True:
            data = request(path, {"command": "status"})
            text = json.dumps(data) if args.json else render_status(data)
            if not args.json and sys.stdout.isatty():
                text = "\x1b[H\x1b[2J" + text  # home, clear: redraw in place
            logs.emit(text)
            time.sleep(max(0.1, args.watch))
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        return 0


def reload(path: str, args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        result = request(path, {"command": "reload"}, timeout=args.timeout)
    except TimeoutError:
        raise ControlFailed(
            f"no outcome after {args.timeout:g}s: the reload goes on (see `status`)"
        ) from None
    for line in result.get("config_kept") or []:
        logs.say(f"warning: not applied without a restart (running value kept): {line}")
    if args.json:
        logs.emit(json.dumps(result, indent=2))
        return 0 if result["outcome"] == "completed" else FAILED
    for line in result.get("config_applied") or []:
        logs.emit(f"config applied: {line}")
    if result["outcome"] == "completed":
        logs.emit(
            f"reload completed: every worker replaced in {result['duration_s']:.2f}s "
            f"(generation {result['generation']})"
        )
    else:
        error = (result.get("error") or "").strip().splitlines()
        shown = "\n".join("  " + line for line in error[-8:])
        logs.emit(
            f"reload aborted after {time.monotonic() - started:.2f}s: the new code cannot "
            f"start; the old workers keep serving\n{shown}"
        )
    return 0 if result["outcome"] == "completed" else FAILED


def scale(path: str, args: argparse.Namespace) -> int:
    result = request(path, {"command": "scale", "workers": args.workers})
    if args.json:
        logs.emit(json.dumps(result, indent=2))
        return 0
    for warning in result["warnings"]:
        logs.say(f"warning: above the sizing plan: {warning}")
    logs.emit(f"scaled to {result['workers']} workers")
    return 0


def stop(path: str, args: argparse.Namespace) -> int:
    result = request(path, {"command": "stop", "now": args.now}, timeout=None)
    pid = result["pid"]
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(pid):
        raise ControlFailed(f"master {pid} closed its control socket but is still running")
    logs.emit(json.dumps({"pid": pid, "stopped": True}) if args.json else f"master {pid} stopped")
    return 0


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def config_running(path: str, args: argparse.Namespace) -> int:
    """`asgi-supervise config --running`: what the running master uses, with sources."""
    from asgi_supervise.cli import config_text

    data = request(path, {"command": "config"})
    if args.json:
        logs.emit(json.dumps(data, indent=2))
    else:
        logs.emit(config_text(data, f"# running master; profile: {data['profile'] or '(none)'}"))
    return 0


COMMAND = {
    "status": status,
    "reload": reload,
    "scale": scale,
    "stop": stop,
    "config": config_running,
}


# --- the status table -----------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 1048576:.1f} MiB"


def render_status(data: dict[str, Any]) -> str:
    master = data["master"]
    head = (
        f"master {master['pid']}  {master['phase']}  up {_age(master['uptime_s'])}  "
        f"{master['workers_ready']}/{master['workers_target']} ready  "
        f"generation {master['generation']}"
    )
    rows = [("SLOT", "PID", "STATE", "AGE", "REQS", "CONNS", "RSS", "CPU", "RESTARTS", "GEN")]
    for w in data["workers"]:
        state = w["state"] if not w["stopping"] else f"draining ({w['stopping']})"
        rows.append(
            (
                str(w["slot"]),
                str(w["pid"]),
                state,
                _age(w["age_s"]),
                str(w["requests"]),
                str(w["connections"]),
                _mib(w["rss_bytes"]),
                f"{w['cpu_percent']:.1f}%" if w["cpu_percent"] is not None else "-",
                str(w.get("restarts", 0)),
                str(w["generation"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    for fs in data.get("fork_servers", ()):
        table.append(
            f"fork server {fs['pid']}  generation {fs['generation']}  {fs['state']}  "
            f"up {_age(fs['age_s'])}  {fs['forks']} forks  RSS {_mib(fs['rss_bytes'])}  "
            f"PSS {_mib(fs['pss_bytes'])}"
            + ("  app preloaded" if fs["preload"] else "")
            + (f"  standby {fs['standby_pid']}" if fs.get("standby_pid") else "")
        )
    plan = data["plan"]
    why = (
        "as configured"
        if plan["limited_by"] == "configured"
        else f"limited by {plan['limited_by']}"
    )
    lines = [head, *table, f"plan: {plan['workers']} workers, {why}"]
    lines += [f"  warning: {w}" for w in plan["warnings"]]
    lines.append(f"phase: {master['phase']}" + ("; reloading" if master["reloading"] else ""))
    last = master.get("last_reload")
    if last is None:
        lines.append("last reload: none")
    else:
        ago = _age(max(0.0, time.time() - last["finished_at"]))
        text = f"last reload: {last['outcome']} in {last['duration_s']:.2f}s, {ago} ago"
        if last.get("error"):
            text += ": " + last["error"].strip().splitlines()[-1]
        lines.append(text)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1], sys.argv[2:]))
