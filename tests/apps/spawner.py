"""testapp plus `/spawn`: the app starts a background process, as `os.system("... &")` does.

The background process's pid goes to the file named by SPAWNER_PIDFILE.
"""

import os

from testapp import _respond
from testapp import app as testapp


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/spawn":
        os.system(f"sleep 20 & echo $! > {os.environ['SPAWNER_PIDFILE']}")
        return await _respond(send, 200, b"spawned")
    return await testapp(scope, receive, send)
