"""pytest plugin for .ci/run: asgi_supervise.worker._meter is the AddressSanitizer build.

`.ci/run` compiles _meter.c with -fsanitize=address into a temporary directory and names
the file in ASAN_METER; loaded here, before anything imports the meter, it stands in for
the extension the install built, so tests/unit/test_meter.py exercises it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

NAME = "asgi_supervise.worker._meter"

spec = importlib.util.spec_from_file_location(NAME, os.environ["ASAN_METER"])
assert spec is not None and spec.loader is not None, os.environ["ASAN_METER"]
module = importlib.util.module_from_spec(spec)
sys.modules[NAME] = module
spec.loader.exec_module(module)

from asgi_supervise.worker import meter  # noqa: E402

assert meter.Meter is module.Meter, "the meter under test is not the AddressSanitizer build"
