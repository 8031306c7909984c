"""The command line as people coming from gunicorn, pm2 or systemctl type it: --help
and serving with -w/-b through the binary (the spellings as settings, and their usage
errors, in tests/unit/test_cli_spellings.py)."""

from __future__ import annotations

import re

import pytest

from conftest import free_port, run_cli

pytestmark = pytest.mark.timeout(60)


def test_help_lists_the_commands_before_the_options():
    done = run_cli("--help")
    assert done.returncode == 0
    text = done.stdout
    commands = text.index("commands:")
    for command in ("[run] APP", "config", "config --running", "plan", "status", "reload",
                    "scale N|+N|-N", "stop [--now]"):  # fmt: skip
        assert f"\n  {command}" in text[commands:], command
    assert commands < text.index("\nbind:") < text.index("\nworkers:")
    # Python 3.13's argparse names the metavar once: "-b, --bind ADDRESS"
    for short, long, metavar in (("-b", "--bind", "ADDRESS"), ("-w", "--workers", "WORKERS")):
        pattern = rf"{short}( {metavar})?, {long} {metavar}"
        assert re.search(pattern, text), pattern


def test_dash_w_and_dash_b_serve_like_workers_host_port(supervisor):
    port = free_port()
    server = supervisor("testapp:app", "-w", "3", "-b", f"127.0.0.1:{port}", port=port)
    server.wait_ready(3)
    assert len(server.serving_pids(3)) == 3
    assert f"serving http://127.0.0.1:{port} with 3 workers" in server.log()
