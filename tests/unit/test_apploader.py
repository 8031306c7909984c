"""The master's app check: a missing attribute is a usage error only when the source is sure.

`apploader.check` reads the module's source with `ast` and runs none of it; anything that
could create the name at import time leaves the decision to the worker's real import.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from asgi_supervise.worker import apploader

_names = itertools.count()


def module(tmp_path: Path, source: str) -> str:
    """A fresh module name per case: `check` searches `tmp_path` first."""
    name = f"appcheck_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(source)
    return name


@pytest.mark.parametrize(
    "source",
    [
        "app = object()\n",
        "app: object = object()\n",
        "def app(scope, receive, send): ...\n",
        "async def app(scope, receive, send): ...\n",
        "class app: ...\n",
        "from os import path as app\n",
        "import os as app\n",
        "import os\nif os.environ:\n    app = 1\nelse:\n    pass\n",
        "try:\n    import nothing\nexcept ImportError:\n    app = 1\n",
        "for app in range(1): ...\n",
        "with open(__file__) as app: ...\n",
        "(app := 1)\n",
        "from os import *\n",  # could be anything
        "globals()['app'] = 1\n",
        "import sys\nsetattr(sys.modules[__name__], 'app', 1)\n",
        "def __getattr__(name): return 1\n",
        "def make():\n    global app\n    app = 1\nmake()\n",
        "app = = 1\n",  # a syntax error: the worker reports the syntax error with its traceback
    ],
    ids=lambda source: source.splitlines()[0][:30],
)
def test_names_the_source_may_bind_pass(tmp_path: Path, source: str):
    apploader.check(f"{module(tmp_path, source)}:app", str(tmp_path))


@pytest.mark.parametrize(
    "source",
    [
        "",
        "ap = 1\n",
        "def make():\n    app = 1\n",
        "class C:\n    app = 1\n",
        "import app.x as y\n",
    ],
    ids=["empty", "typo", "local", "class-attribute", "import-as-other"],
)
def test_names_the_source_surely_lacks_are_usage_errors(tmp_path: Path, source: str):
    name = module(tmp_path, source)
    with pytest.raises(apploader.AppStringError) as error:
        apploader.check(f"{name}:app", str(tmp_path))
    assert error.value.detail == f"module '{name}' has no attribute 'app'"


def test_a_dotted_attribute_is_checked_at_its_first_name(tmp_path: Path):
    name = module(tmp_path, "class factory:\n    app = 1\n")
    apploader.check(f"{name}:factory.app", str(tmp_path))
    with pytest.raises(apploader.AppStringError):
        apploader.check(f"{name}:nothing.app", str(tmp_path))


def test_a_package_submodule_counts_as_an_attribute(tmp_path: Path):
    package = tmp_path / "appcheck_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "web.py").write_text("app = 1\n")
    apploader.check("appcheck_pkg:web", str(tmp_path))  # set once anything imports it
    apploader.check("appcheck_pkg.web:app", str(tmp_path))
    with pytest.raises(apploader.AppStringError):
        apploader.check("appcheck_pkg:app", str(tmp_path))
