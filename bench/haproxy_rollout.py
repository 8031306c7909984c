"""A rolling deploy behind a real load balancer: HAProxy in front of two instances.

HAProxy health-checks each instance like a Kubernetes readiness probe (every 0.5 s, out
after 2 failures, back after 1 success) and balances keep-alive traffic across both.
Under steady load through HAProxy (~200 req/s over 8 keep-alive clients), each instance in
turn is replaced the way a Deployment rollout replaces a pod: SIGTERM to the old one, and
once it is gone the new version of the app starts on the same port. Counted: every failed
request (any non-200 answer, reset, timeout) and which version answered after the rollout.

The same rollout runs with asgi-supervise (health check on the master's /readyz, which
turns 503 the moment SIGTERM arrives while the workers keep serving for --drain-delay) and
with plain `uvicorn --workers 2` (health check on the app: uvicorn has no readiness of its
own and stops accepting at SIGTERM).

By default HAProxy does not retry (`retries 0`): like a Service's kube-proxy, a request
sent to an instance that is going away fails visibly. `--retries 3` gives the forgiving
setup of many ingress proxies (retry a failed connection, on another server).

  .venv/bin/python bench/haproxy_rollout.py                 # both servers, 3 rounds each
  .venv/bin/python bench/haproxy_rollout.py --rounds 1 --servers asgi-supervise

Needs haproxy (apt-get install haproxy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
sys.path.insert(0, str(REPO / "bench"))

from harness import free_port  # noqa: E402
from loadgen import Load  # noqa: E402

CHECK_INTER_MS = 500  # the readiness probe's period
CHECK_FALL = 2  # its failureThreshold
DRAIN_DELAY = 3.0  # >= CHECK_FALL x CHECK_INTER (1 s) + slack for a loaded machine
SERVERS = ("asgi-supervise", "uvicorn")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def http_status(port: int, path: str) -> int | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Instance:
    """One server process (one 'pod'): its app port, health port and check path."""

    server: str
    version: str
    port: int
    check_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def check_path(self) -> str:
        return "/readyz" if self.server == "asgi-supervise" else "/version"

    def command(self) -> list[str]:
        if self.server == "asgi-supervise":
            return [
                sys.executable, "-m", "asgi_supervise", "testapp:app", "--workers", "2",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics", "--metrics-host", "127.0.0.1", "--metrics-port", str(self.check_port),
                "--drain-delay", str(DRAIN_DELAY), "--graceful-timeout", "10",
                "--no-access-log",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "uvicorn", "testapp:app", "--workers", "2",
            "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
            "--timeout-graceful-shutdown", "10",
        ]  # fmt: skip

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        env.update(TESTAPP_VERSION=self.version, PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=APPS, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.server} exited: {self.log.read_text()[-2000:]}")
        return http_status(self.check_port, self.check_path) == 200

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as the kubelet sends it; its exit code once it is gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and wait; then SIGKILL whatever of its tree is left (uvicorn's workers
        outlive a killed parent)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


HAPROXY_CONFIG = """
global
    maxconn 2000
    stats socket {workdir}/haproxy.sock mode 600 level user
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    retries {retries}
    {redispatch}
frontend fe
    bind 127.0.0.1:{frontend}
    default_backend pods
backend pods
    balance roundrobin
    option httpchk
    http-check send meth GET uri {check_path}
    http-check expect status 200
    default-server inter {inter}ms fall {fall} rise 1
{servers}
"""


@dataclass
class Result:
    server: str
    total: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    versions_during: dict[str, int] = field(default_factory=dict)
    versions_after: dict[str, int] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)


class LoadBalanced:
    """HAProxy and two instances of `server`, all on loopback ports; cleaned up on exit."""

    def __init__(self, server: str, workdir: Path, retries: int = 0):
        if shutil.which("haproxy") is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.server = server
        self.workdir = workdir
        self.retries = retries
        self.frontend = free_port()
        self.instances = [
            Instance(server, "1", free_port(), 0, workdir / f"{server}-{slot}.log")
            for slot in ("a", "b")
        ]
        for instance in self.instances:
            instance.check_port = free_port() if server == "asgi-supervise" else instance.port
        self.retired: list[Instance] = []
        self.haproxy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            wait_until(instance.ready, 30, f"{instance.server} on {instance.port} ready")
        servers = "\n".join(
            f"    server {slot} 127.0.0.1:{i.port} check port {i.check_port}"
            for slot, i in zip("ab", self.instances, strict=True)
        )
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                workdir=self.workdir, frontend=self.frontend, servers=servers,
                retries=self.retries, redispatch="option redispatch" if self.retries else "",
                check_path=self.instances[0].check_path, inter=CHECK_INTER_MS, fall=CHECK_FALL,
            )
        )  # fmt: skip
        check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config: {check.stdout}{check.stderr}")
        with (self.workdir / "haproxy.log").open("ab") as out:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_until(lambda: http_status(self.frontend, "/version") == 200, 15, "haproxy serving")

    def roll(self, version: str) -> list[int]:
        """Replace each instance in turn: SIGTERM the old, then start the new version on
        its port and wait until the health check would call it ready."""
        codes = []
        for slot, old in enumerate(list(self.instances)):
            codes.append(old.terminate())
            self.retired.append(old)
            new = Instance(old.server, version, old.port, old.check_port, old.log)
            new.start()
            self.instances[slot] = new
            wait_until(new.ready, 30, f"the new {new.server} on {new.port} ready")
            # HAProxy's next check (within one interval) puts it back in rotation.
            wait_until(lambda s=slot: self.server_up(s), 10, "haproxy sending to the new instance")
        return codes

    def server_up(self, slot: int) -> bool:
        """HAProxy's own view of a server (its stats socket): UP means in rotation."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.workdir / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line.startswith("pods,")]
        return any(row[1] == "ab"[slot] and row[17].startswith("UP") for row in rows)

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)
        for instance in self.instances + self.retired:
            instance.stop()


@contextlib.contextmanager
def load_balanced(server: str, workdir: Path, retries: int = 0) -> Iterator[LoadBalanced]:
    lb = LoadBalanced(server, workdir, retries)
    try:
        lb.start()
        yield lb
    finally:
        lb.stop()


def rollout(
    server: str, workdir: Path, rate: float = 200, clients: int = 8, retries: int = 0
) -> Result:
    """One rollout from version 1 to 2 under load; then 400 requests on the new version."""
    result = Result(server)
    with load_balanced(server, workdir, retries) as lb:
        with Load(
            lb.frontend, rate=rate, clients=clients, path="/version", max_seconds=120
        ) as load:
            load.wait_for_requests(200, timeout=20)
            result.exit_codes = lb.roll("2")
            seen = load.stats.total
            load.wait_for_requests(seen + 200, timeout=20)  # steady traffic after the roll
        stats = load.stats
        result.total, result.failed = stats.total, stats.failed
        result.failures = dict(stats.failures)
        result.examples = stats.examples
        result.versions_during = {str(k): v for k, v in stats.pids.items()}
        with Load(
            lb.frontend, rate=rate, clients=clients, path="/version", max_seconds=60
        ) as after:
            after.wait_for_requests(400, timeout=30)
        result.versions_after = {str(k): v for k, v in after.stats.pids.items()}
        result.failed += after.stats.failed
        result.total += after.stats.total
        for kind, count in after.stats.failures.items():
            result.failures[kind] = result.failures.get(kind, 0) + count
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--retries", type=int, default=0, help="HAProxy's retries (0: none)")
    args = parser.parse_args()
    results: dict[str, list[Result]] = {}
    for round_ in range(args.rounds):
        for server in args.servers.split(","):
            with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
                result = rollout(server, Path(tmp), rate=args.rate, retries=args.retries)
            results.setdefault(server, []).append(result)
            print(
                f"round {round_ + 1} {server:15} failed {result.failed:4}/{result.total:5} "
                f"{dict(Counter(result.failures))} after: {result.versions_after} "
                f"exit codes {result.exit_codes}",
                flush=True,
            )
    summary = {
        server: {
            "rounds": len(rs),
            "failed": [r.failed for r in rs],
            "total": [r.total for r in rs],
            "failures": [r.failures for r in rs],
            "only_new_after": all(set(r.versions_after) == {"2"} for r in rs),
        }
        for server, rs in results.items()
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
