"""The app string: checked in the master without importing, imported in the worker."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class AppStringError(Exception):
    """The app string is malformed or names a module that does not exist."""


def parse(app: str) -> tuple[str, str]:
    module, sep, attr = app.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise AppStringError(f"app '{app}' is not in the form module:attribute (e.g. main:app)")
    if not all(part.isidentifier() for part in module.split(".")):
        raise AppStringError(f"app '{app}': '{module}' is not a valid module path")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise AppStringError(f"app '{app}': '{attr}' is not a valid attribute path")
    return module, attr


def check(app: str, app_dir: str) -> None:
    """Find the module on the path without running any of its code (or its packages')."""
    module, _ = parse(app)
    search: Sequence[str] | None = [str(Path(app_dir).resolve()), *sys.path]
    name = ""
    for part in module.split("."):
        name = f"{name}.{part}" if name else part
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            if name in sys.builtin_module_names:
                return
            raise AppStringError(
                f"app '{app}': no module named '{name}' (looked in {app_dir} and sys.path)"
            )
        search = spec.submodule_search_locations
        if search is None and name != module:
            raise AppStringError(f"app '{app}': '{name}' is a module, not a package")


def load(app: str, app_dir: str, factory: bool) -> Any:
    """Import and return the ASGI app; errors propagate for the worker to report."""
    module_name, attr = parse(app)
    sys.path.insert(0, str(Path(app_dir).resolve()))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module '{module_name}' has no attribute '{attr}'") from None
    if factory:
        obj = obj()
    return obj
