"""`launch`: which command lines start the first fork server before the imports, and
what it imports before that fork."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asgi_supervise.launch import SHARED, forks


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["app:app"], {}, True),
        (["run", "app:app", "--workers", "4"], {}, True),
        (["app:app", "--worker-start", "fork"], {}, True),
        ([], {}, True),  # the app may come from a file or ASGI_SUPERVISE_APP
        (["app:app", "--worker-start", "exec"], {}, False),
        (["app:app", "--worker-start=exec"], {}, False),
        (["app:app", "--engine", "gunicorn"], {}, False),
        (["app:app"], {"ASGI_SUPERVISE_WORKER_START": "exec"}, False),
        (["app:app"], {"ASGI_SUPERVISE_ENGINE": "Gunicorn"}, False),
        (["config", "app:app"], {}, False),
        (["plan"], {}, False),
        (["status"], {}, False),
        (["reload", "--control-socket", "x.sock"], {}, False),
        (["app:app", "--help"], {}, False),
        (["--version"], {}, False),
        # A value that only looks like the flag's: still a fork server.
        (["app:app", "--app-dir", "exec"], {}, True),
    ],
)
def test_forks(argv: list[str], environ: dict[str, str], expected: bool):
    assert forks(argv, environ) is expected


def _imported(code: str) -> set[str]:
    """The modules a fresh interpreter holds after `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.timeout(60)
def test_what_launch_imports_before_the_fork_the_master_and_a_worker_both_import():
    """`SHARED` is imported once, before the first fork server is forked, to be shared:
    each of it must be something both sides import anyway, or it is only a cost."""
    fork_server = _imported(
        "from asgi_supervise.worker import forkserver\nforkserver._import(forkserver.MACHINERY)"
    )
    master = _imported(
        "import asgi_supervise.launch, asgi_supervise.config.reader\n"
        "import asgi_supervise.master.start, asgi_supervise.master.arbiter"
    )
    assert set(SHARED) <= fork_server & master, set(SHARED) - (fork_server & master)
