"""Where settings come from, in precedence order, and what to say when one is wrong.

defaults < profile < config file < environment < command line. Each layer is a plain
dict of field name -> raw value plus a way to spell a key the way the user wrote it, so
an error can say ``ASGI_SUPERVISE_WORKERS='abc' (environment)`` rather than ``workers``.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from asgi_supervise.profiles import ProfileError, find_profile
from asgi_supervise.settings import ENV_PREFIX, FIELDS, Settings

CONFIG_FILE = "asgi-supervise.toml"
PYPROJECT_TABLE = ("tool", "asgi-supervise")


class ConfigError(Exception):
    """Bad user input: printed as one line, exit code 2."""


@dataclass
class Layer:
    source: str  # "profile", "file", "env", "flag"
    where: str  # human description: "environment", "asgi-supervise.toml", ...
    values: dict[str, Any] = field(default_factory=dict)
    spell: Callable[[str], str] = lambda name: name
    profile: Any = None  # a config file may choose its profile: `profile = "prod"`

    def describe(self, name: str) -> str:
        return f"{self.spell(name)}={self.values[name]!r} ({self.where})"


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    origins: dict[str, Layer | None]  # None: built-in default
    profile: str | None

    def origin(self, name: str) -> str:
        layer = self.origins.get(name)
        return "default" if layer is None else f"{layer.source}: {layer.where}"


def _normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _suggest(name: str, spell: Callable[[str], str] = _kebab) -> str:
    close = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
    return f"; did you mean '{spell(close[0])}'?" if close else ""


def _table_layer(source: str, where: str, table: Mapping[str, Any]) -> Layer:
    """A profile or config-file table; unknown keys are rejected with a suggestion."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "profile" and source == "file":  # chooses the layer below it
            continue
        name = _normalise_key(key)
        if name not in FIELDS:
            raise ConfigError(f"unknown setting '{key}' in {where}{_suggest(name)}")
        values[name] = value
    return Layer(source, where, values, spell=_kebab, profile=table.get("profile"))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def profile_layer(name: str) -> Layer:
    try:
        path = find_profile(name)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    table = read_toml(path, "profile")
    return _table_layer("profile", f"profile {name}", table)


def file_layer(explicit: str | None, cwd: Path) -> Layer | None:
    """--config FILE, else asgi-supervise.toml, else [tool.asgi-supervise] in pyproject."""
    if explicit:
        path = Path(explicit)
        return _table_layer("file", str(path), read_toml(path, "config file"))
    path = cwd / CONFIG_FILE
    if path.is_file():
        return _table_layer("file", CONFIG_FILE, read_toml(path, "config file"))
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        table: Any = read_toml(pyproject, "config file")
        for key in PYPROJECT_TABLE:
            table = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict):
            return _table_layer("file", "pyproject.toml [tool.asgi-supervise]", table)
    return None


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


# Variables that read like ours but name no setting: checked, not forwarded.
_ENV_CONTROL = {"PROFILE", "CONFIG"}


def env_layer(environ: Mapping[str, str]) -> Layer:
    values: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX) :] in _ENV_CONTROL:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in FIELDS:
            raise ConfigError(f"unknown environment variable {key}{_suggest(name, _env_name)}")
        values[name] = value
    return Layer("env", "environment", values, spell=_env_name)


def web_concurrency_layer(environ: Mapping[str, str]) -> Layer:
    """WEB_CONCURRENCY sets the worker count, as in every other server; our own var wins."""
    values = {"workers": environ["WEB_CONCURRENCY"]} if "WEB_CONCURRENCY" in environ else {}
    return Layer("env", "environment", values, spell=lambda n: "WEB_CONCURRENCY")


def flag_layer(values: dict[str, Any]) -> Layer:
    return Layer("flag", "command line", values, spell=lambda n: "--" + _kebab(n))


def _expected(schema: dict[str, Any]) -> str:
    """Say in words what a field accepts, from its JSON schema."""
    if "anyOf" in schema:
        parts = [_expected(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    if "enum" in schema or "const" in schema:
        options = schema.get("enum", [schema.get("const")])
        listed = ", ".join(repr(o) for o in options)
        return listed if len(options) == 1 else "one of " + listed
    kind = schema.get("type")
    noun = {
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "string": "a string",
        "array": "a list (comma-separated)",
    }.get(kind, kind or "a value")
    bounds = [
        f"{op} {schema[key]}"
        for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
        if key in schema
    ]
    return noun + (" " + " and ".join(bounds) if bounds else "")


def _explain(exc: ValidationError, origins: dict[str, Layer | None]) -> str:
    properties = Settings.model_json_schema()["properties"]
    messages = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        if name not in FIELDS:  # a whole-model rule: the message says it all
            messages.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        layer = origins.get(name)
        where = layer.describe(name) if layer else f"{name} (default)"
        messages.append(f"{where}: expected {_expected(properties[name])}")
    return "; ".join(dict.fromkeys(messages))


def _check_conflicts(origins: dict[str, Layer | None]) -> None:
    """Options that make no sense together when the user set both."""
    explicit = {name for name, layer in origins.items() if layer is not None}
    for socket_opt in ("uds", "fd"):
        for other in ("host", "port"):
            if socket_opt in explicit and other in explicit:
                a, b = origins[socket_opt], origins[other]
                assert a and b
                raise ConfigError(
                    f"{a.describe(socket_opt)} conflicts with {b.describe(other)}: "
                    f"a --{socket_opt} server does not bind --{other}"
                )


def load(
    flags: dict[str, Any],
    *,
    profile: str | None = None,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Loaded:
    """Merge every layer, validate once, and keep where each value came from."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    file = file_layer(config_file or environ.get(ENV_PREFIX + "CONFIG"), cwd)
    profile = profile or environ.get(ENV_PREFIX + "PROFILE")
    if profile is None and file is not None and file.profile is not None:
        if not isinstance(file.profile, str):
            raise ConfigError(f"profile={file.profile!r} ({file.where}): expected a profile name")
        profile = file.profile

    layers = [
        profile_layer(profile) if profile else None,
        file,
        web_concurrency_layer(environ),
        env_layer(environ),
        flag_layer(flags),
    ]
    merged: dict[str, Any] = {}
    origins: dict[str, Layer | None] = dict.fromkeys(FIELDS)
    for layer in filter(None, layers):
        for name, value in layer.values.items():
            merged[name] = value
            origins[name] = layer
    _check_conflicts(origins)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origins)) from None
    return Loaded(settings, origins, profile)
