"""gunicorn's spellings (-w, -b/--bind, --timeout, --keep-alive, --pid) are the same
settings as ours, and their mistakes one-line usage errors: the CLI's `main` in-process
(conftest.run_main). tests/e2e/test_cli_for_people.py serves with them through the binary.
"""

from __future__ import annotations

import json

import pytest

from conftest import free_port
from conftest import run_main as run_cli

pytestmark = pytest.mark.timeout(60)


def _config(*args: str) -> dict:
    done = run_cli("config", "--json", *args)
    assert done.returncode == 0, done.stderr
    return {k: v["value"] for k, v in json.loads(done.stdout)["settings"].items()}


def test_gunicorn_spellings_are_the_same_settings():
    port = str(free_port())
    gunicorn = _config("-w", "3", "-b", f"127.0.0.1:{port}", "--timeout", "12",
                       "--keep-alive", "7", "--pid", "app.pid")  # fmt: skip
    ours = _config("--workers", "3", "--host", "127.0.0.1", "--port", port,
                   "--worker-timeout", "12", "--timeout-keep-alive", "7",
                   "--pid-file", "app.pid")  # fmt: skip
    assert gunicorn == ours
    assert _config("--bind", "unix:/tmp/app.sock")["uds"] == "/tmp/app.sock"
    six = _config("-b", "[::1]:8123")
    assert (six["host"], six["port"]) == ("::1", 8123)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-b", "127.0.0.1:1", "-b", "127.0.0.1:2"), "a second --bind (127.0.0.1:1 was given)"),
        (("--bind", "127.0.0.1:1", "--port", "3"), "--bind 127.0.0.1:1 and --port both set"),
        (("-b", "127.0.0.1:http"), "expected HOST:PORT with a port 0-65535, or unix:PATH"),
        (("-w", "0"), "workers"),
    ],
)
def test_bind_mistakes_are_one_line_usage_errors(args, message):
    done = run_cli("config", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "did you mean" not in done.stderr
