"""testapp plus a prometheus_client counter of its own, as many production apps have.

In a worker it lands in the master's multiprocess directory (PROMETHEUS_MULTIPROC_DIR).
"""

from prometheus_client import Counter
from testapp import app as testapp

HANDLED = Counter("app_handled", "Requests the app handled.", ["method"])


async def app(scope, receive, send):
    if scope["type"] == "http":
        HANDLED.labels(scope["method"]).inc()
    await testapp(scope, receive, send)
