"""On PYTHONPATH, makes a worker's import of uvicorn slow, as on a loaded machine.

Active only in `python -m asgi_supervise.worker` processes (and fork servers, which
import it for their workers) and with SLOW_IMPORT_GATE set:
the first `import uvicorn` writes `importing-<pid>` into that directory, then waits while
`hold` exists there (at most 30 s) before importing it for real.
"""

import os
import sys
import time
from pathlib import Path

_gate = os.environ.get("SLOW_IMPORT_GATE")


class _SlowUvicorn:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "uvicorn":
            return None
        sys.meta_path.remove(_SlowUvicorn)
        Path(_gate, f"importing-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while Path(_gate, "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return None  # the regular finders import it now


WORKER_MODULES = {"asgi_supervise.worker", "asgi_supervise.worker.forkserver"}
if _gate and WORKER_MODULES & set(sys.orig_argv):
    sys.meta_path.insert(0, _SlowUvicorn)
