"""On PYTHONPATH, makes an import slow, as on a loaded machine, until a test lets it go.

- SLOW_IMPORT_GATE: in `python -m asgi_supervise.worker` processes (and fork servers,
  which import it for their workers), the first `import uvicorn`.
- SLOW_MASTER_GATE: in the master (`python -m asgi_supervise`), the import of its
  arbiter, which comes after it asked for its first workers.

The import writes `importing-<pid>` into the gate's directory, then waits while `hold`
exists there (at most 30 s) before importing for real.
"""

import os
import sys
import time
from pathlib import Path


class _Slow:
    def __init__(self, module: str, gate: str) -> None:
        self.module, self.gate = module, gate

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        Path(self.gate, f"importing-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while Path(self.gate, "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return None  # the regular finders import it now


WORKER_MODULES = {"asgi_supervise.worker", "asgi_supervise.worker.forkserver"}
if os.environ.get("SLOW_IMPORT_GATE") and WORKER_MODULES & set(sys.orig_argv):
    sys.meta_path.insert(0, _Slow("uvicorn", os.environ["SLOW_IMPORT_GATE"]))
if os.environ.get("SLOW_MASTER_GATE") and sys.orig_argv[1:3] == ["-m", "asgi_supervise"]:
    sys.meta_path.insert(0, _Slow("asgi_supervise.master.arbiter", os.environ["SLOW_MASTER_GATE"]))
