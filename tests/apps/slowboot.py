"""testapp, but each worker's import can be held: a slow boot that a test can catch.

With SLOWBOOT_DIR set, every import writes `booting-<pid>` there, then waits while
`hold` exists there (at most SLOWBOOT_MAX seconds, 30 by default).
"""

import os
import time
from pathlib import Path

from testapp import app  # noqa: F401

_where = os.environ.get("SLOWBOOT_DIR")
if _where:
    Path(_where, f"booting-{os.getpid()}").touch()
    _deadline = time.monotonic() + float(os.environ.get("SLOWBOOT_MAX", "30"))
    while Path(_where, "hold").exists() and time.monotonic() < _deadline:
        time.sleep(0.02)
