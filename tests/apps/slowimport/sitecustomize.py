"""On PYTHONPATH, makes an import slow, as on a loaded machine, until a test lets it go.

- SLOW_IMPORT_GATE: the first `import uvicorn` of a process: an exec'd worker's, or a
  fork server's (which imports it for its workers; the first is forked from the master,
  which itself never imports uvicorn).
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


if os.environ.get("SLOW_IMPORT_GATE"):
    sys.meta_path.insert(0, _Slow("uvicorn", os.environ["SLOW_IMPORT_GATE"]))
if os.environ.get("SLOW_MASTER_GATE") and sys.orig_argv[1:3] == ["-m", "asgi_supervise"]:
    sys.meta_path.insert(0, _Slow("asgi_supervise.master.arbiter", os.environ["SLOW_MASTER_GATE"]))
