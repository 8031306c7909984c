"""`launch.forks`: which command lines start the first fork server before the imports."""

from __future__ import annotations

import pytest

from asgi_supervise.launch import forks


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
