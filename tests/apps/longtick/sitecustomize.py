"""On PYTHONPATH: workers tick, and look at their connections while draining, once an hour.

A drain that begins only at uvicorn's next tick, or ends only when it next looks at its
connections, then never completes within a test: what ends it is being woken, by the
signal that starts it and by its last connection closing (`WorkerServer.wake`).

Set as `asgi_supervise.worker.server` is imported, in whichever process imports it: the
fork servers (the first is forked from the master, so no command line tells it apart)
and exec'd workers. The master never imports it.
"""

import importlib.util
import sys

MODULE = "asgi_supervise.worker.server"


class _Patch:
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            from asgi_supervise.worker import draining

            module.TICK = draining.POLL = 3600.0

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
