"""The app string: checked in the master without importing, imported in the worker."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class AppStringError(Exception):
    """The app string is malformed or names a module or attribute that does not exist."""

    def __init__(self, app: str, detail: str):
        super().__init__(f"app '{app}': {detail}")
        self.detail = detail  # what is wrong, for a caller that names the app its own way


def parse(app: str) -> tuple[str, str]:
    module, sep, attr = app.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise AppStringError(app, "not in the form module:attribute (e.g. main:app)")
    if not all(part.isidentifier() for part in module.split(".")):
        raise AppStringError(app, f"'{module}' is not a valid module path")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise AppStringError(app, f"'{attr}' is not a valid attribute path")
    return module, attr


def check(app: str, app_dir: str) -> None:
    """Find the module on the path, and the attribute in its source, without running any
    of its code (or its packages')."""
    module, attr = parse(app)
    search: Sequence[str] | None = [str(Path(app_dir).resolve()), *sys.path]
    name = ""
    spec = None
    for part in module.split("."):
        name = f"{name}.{part}" if name else part
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            if name in sys.builtin_module_names:
                return
            raise AppStringError(
                app, f"no module named '{name}' (looked in {app_dir} and sys.path)"
            )
        search = spec.submodule_search_locations
        if search is None and name != module:
            raise AppStringError(app, f"'{name}' is a module, not a package")
    top = attr.split(".")[0]
    if spec is not None and not _may_define(spec, top):
        raise AppStringError(app, f"module '{module}' has no attribute '{top}'")


# Names that let a module create attributes its source does not spell out.
_DYNAMIC = {"globals", "vars", "exec", "setattr", "__getattr__", "__dict__", "modules"}


def _may_define(spec: importlib.machinery.ModuleSpec, attr: str) -> bool:
    """False only when the module's source surely binds no top-level `attr`.

    Anything this cannot see through says True, and the worker's import decides: no
    source (an extension, bytecode only), a syntax error, `import *`, `global`, or any
    use of globals(), setattr(), exec(), a module __getattr__, sys.modules; in a package,
    a submodule of that name (importing it anywhere sets the attribute).
    """
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return True
    for location in spec.submodule_search_locations or []:
        if (Path(location) / attr).is_dir() or (Path(location) / f"{attr}.py").is_file():
            return True
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except (OSError, SyntaxError, ValueError):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if isinstance(node, (ast.Global, ast.Nonlocal)) and attr in node.names:
            return True
        if _name_of(node) in _DYNAMIC:
            return True
    return attr in _top_level_names(tree)


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    return None


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names the module may bind at top level: defs, classes, imports, and every name
    stored anywhere in a top-level statement that is not a def (if/try/for/with/match
    blocks included; more than bound is fine, it only means the worker decides)."""
    bound: set[str] = set()
    for node in tree.body:
        nodes = [node] if isinstance(node, _DEFS) else list(ast.walk(node))
        for child in nodes:
            if isinstance(child, _DEFS):
                bound.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name.split(".")[0]) for a in child.names)
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                bound.add(child.id)
            elif isinstance(child, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
                bound.add(child.name or "")
    return bound


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


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
