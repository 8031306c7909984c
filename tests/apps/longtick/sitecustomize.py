"""On PYTHONPATH: workers tick, and look at their connections while draining, once an hour.

A drain that begins only at uvicorn's next tick, or ends only when it next looks at its
connections, then never completes within a test: what ends it is being woken, by the
signal that starts it and by its last connection closing (`WorkerServer.wake`).
"""

import sys

WORKER_MODULES = {"asgi_supervise.worker", "asgi_supervise.worker.forkserver"}
if WORKER_MODULES & set(sys.orig_argv):
    from asgi_supervise.worker import draining, server

    server.TICK = draining.POLL = 3600.0
