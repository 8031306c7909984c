"""Names made at import time: the master's source check cannot rule any out, the worker can."""

from testapp import app as _app

globals()["app"] = _app
