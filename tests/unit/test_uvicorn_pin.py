"""The uvicorn the worker was tested with: pinned in pyproject.toml, checked here, and
what a worker does under another one (the Python meter, and a warning)."""

from __future__ import annotations

import logging
import re
import tomllib

import pytest
import uvicorn

from asgi_supervise.worker import meter
from asgi_supervise.worker.meter import TESTED_UVICORN, RequestMetrics
from conftest import REPO


def test_the_installed_uvicorn_is_the_tested_series() -> None:
    """Fails loudly on a new uvicorn rather than letting the worker misbehave under it."""
    assert meter.uvicorn_tested(uvicorn.__version__), (
        f"uvicorn {uvicorn.__version__} is installed, but asgi-supervise is tested with "
        f"{TESTED_UVICORN}.x: run the whole suite and .ci/run's AddressSanitizer step under "
        "it, then move TESTED_UVICORN (worker/meter.py) and the pin in pyproject.toml"
    )


def test_pyproject_pins_uvicorn_to_the_tested_series() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in dependencies["dependencies"] if re.match(r"uvicorn\b", d)]
    major, minor = map(int, TESTED_UVICORN.split("."))
    assert f">={major}.{minor}" in spec and f"<{major}.{minor + 1}" in spec, spec


@pytest.mark.parametrize("version", ["0.54.0", "0.54.3", "0.54"])
def test_a_tested_uvicorn_gets_the_compiled_meter(version: str) -> None:
    assert meter.meter_for(version) is meter.Meter


@pytest.mark.parametrize("version", ["0.55.0", "0.540.0", "1.0.0", "0.53.9"])
def test_another_uvicorn_gets_the_python_meter_and_a_warning(
    version: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_supervise.worker"):
        chosen = meter.meter_for(version)
    assert chosen is meter.PythonMeter
    if meter.COMPILED:
        assert f"uvicorn {version} is not a release asgi-supervise was tested with" in caplog.text
    assert isinstance(RequestMetrics(lambda *_: None, chosen).meter, meter.PythonMeter)


def test_the_worker_meter_is_chosen_by_the_installed_uvicorn() -> None:
    assert type(RequestMetrics(lambda *_: None).meter) is meter.meter_for(uvicorn.__version__)
