"""Where settings come from, in precedence order, and what to say when one is wrong.

defaults < profile < config file < WEB_CONCURRENCY < gunicorn config file <
GUNICORN_CMD_ARGS < environment < command line (see `gunicorn_layers` for why gunicorn's
sit there). Each layer is a plain dict of field name -> raw value plus a way to spell a
key the way the user wrote it, so an error can say ``ASGI_SUPERVISE_WORKERS='abc'
(environment)`` rather than ``workers``.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from asgi_supervise.config.settings import ENV_PREFIX, FIELDS, Settings, as_values, meta, redact
from asgi_supervise.config.values import ConfigError, Loaded, unset
from asgi_supervise.profiles import ProfileError, find_profile
from asgi_supervise.suggest import did_you_mean

CONFIG_FILE = "asgi-supervise.toml"
LIST_FIELDS = {
    name for name, field in FIELDS.items() if typing.get_origin(field.annotation) is list
}
PYPROJECT_TABLE = ("tool", "asgi-supervise")


@dataclass
class Layer:
    source: str  # "profile", "file", "env", "flag"
    where: str  # human description: "environment", "asgi-supervise.toml", ...
    values: dict[str, Any] = field(default_factory=dict)
    spell: Callable[[str], str] = lambda name: name
    profile: Any = None  # a config file may choose its profile: `profile = "prod"`

    def describe(self, name: str) -> str:
        return f"{self.spell(name)}={redact(name, self.values[name])!r} ({self.where})"

    @property
    def origin(self) -> str:
        """Where its values came from, as `config` shows it: "env: environment"."""
        if self.source == "profile":  # its `where` already says "profile NAME"
            return self.where
        return f"{self.source}: {self.where}"


def _normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _suggest(name: str, spell: Callable[[str], str] = _kebab) -> str:
    return did_you_mean(name, FIELDS, lambda close: f"'{spell(close)}'")


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
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def profile_layer(name: str, chosen_by: str = "") -> Layer:
    """A built-in profile or a profile file; `chosen_by` says who asked for it, for errors."""
    chosen_by = chosen_by or f"--profile={name!r} (command line)"
    try:
        path = find_profile(name)
    except ProfileError as exc:
        raise ConfigError(f"{chosen_by}: {exc}") from None
    table = read_toml(path, "profile")
    return _table_layer("profile", f"profile {name}", table)


def file_layer(explicit: str | None, cwd: Path, chosen_by: str = "") -> Layer | None:
    """--config FILE, else asgi-supervise.toml, else [tool.asgi-supervise] in pyproject."""
    if explicit:
        chosen_by = chosen_by or f"--config={explicit!r} (command line)"
        path = Path(explicit)
        if not path.is_absolute():
            path = cwd / path
        if not path.exists():
            raise ConfigError(f"{chosen_by}: config file {explicit} does not exist")
        return _table_layer("file", explicit, read_toml(path, "config file"))
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
        if table is not None:  # `[tool] asgi-supervise = "x"`: ours, but not a table
            raise ConfigError(
                f"pyproject.toml: [tool.asgi-supervise] must be a table, got {table!r}"
            )
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
        values[name] = _env_list(key, value) if name in LIST_FIELDS else value
    return Layer("env", "environment", values, spell=_env_name)


# Items of a list variable are separated by commas, except where an item may hold one.
_ENV_SEPARATOR = {"headers": "\n"}


def _env_list(key: str, value: str) -> list[str] | str:
    """A JSON array (`["a", "b"]`), else items separated by commas (newlines for headers).

    A plain string is left to the model, which splits comma lists as it does for flags.
    """
    name = key[len(ENV_PREFIX) :].lower()
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{key}={value!r} (environment): not a JSON array of strings ({exc.msg})"
            ) from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key}={value!r} (environment): expected a JSON array of strings")
        return items
    separator = _ENV_SEPARATOR.get(name)
    if separator is None:
        return value
    return [item.strip() for item in value.split(separator) if item.strip()]


def web_concurrency_layer(environ: Mapping[str, str]) -> Layer:
    """WEB_CONCURRENCY sets the worker count, as in every other server; our own var wins."""
    values = {"workers": environ["WEB_CONCURRENCY"]} if "WEB_CONCURRENCY" in environ else {}
    return Layer("env", "environment", values, spell=lambda n: "WEB_CONCURRENCY")


def gunicorn_layers(
    below: list[Layer | None], above: list[Layer], environ: Mapping[str, str], cwd: Path
) -> tuple[list[Layer], list[str]]:
    """The gunicorn config file and GUNICORN_CMD_ARGS as two layers, and their notes.

    They sit above our config file (and the profile, and WEB_CONCURRENCY, which gunicorn
    too ranks below both) and below our environment and command line: a service moving
    off gunicorn runs with what it ran with, over the presets of a profile or a project
    file, while a deliberate ASGI_SUPERVISE_* variable or flag given at deploy time is
    the newer choice and wins. Between the two, gunicorn's own order: the variable over
    the file. The file is --gunicorn-config, else GUNICORN_CMD_ARGS' own --config (as
    gunicorn reads it); never an implicit ./gunicorn.conf.py, which a repository may keep
    from its gunicorn days and which would change a service silently.
    """
    from asgi_supervise.config import gunicorn_conf  # imports gunicorn only when used

    def chosen(layers: list[Layer | None]) -> gunicorn_conf.Choice | None:
        for layer in reversed([layer for layer in layers if layer is not None]):
            if layer.values.get("gunicorn_config"):
                path = str(layer.values["gunicorn_config"])
                return path, layer.describe("gunicorn_config")
        return None

    try:
        read = gunicorn_conf.read(chosen(list(above)), chosen(below), environ, cwd)
    except gunicorn_conf.GunicornConfigError as exc:
        raise ConfigError(str(exc)) from None
    if read is None:
        return [], []
    file, cmd_args = read.file, read.cmd_args
    if read.chosen_by_cmd_args:
        cmd_args.values = {"gunicorn_config": read.path, **cmd_args.values}
        cmd_args.spelled["gunicorn_config"] = "--config"
    layers = [Layer("file", read.path, file.values, file.spell)] if read.path else []
    layers.append(Layer("env", gunicorn_conf.CMD_ARGS, cmd_args.values, cmd_args.spell))
    return layers, [*file.notes, *cmd_args.notes]


def _flag_name(name: str) -> str:
    """The flag as users write it: the app is positional, a list flag takes one item."""
    if name == "app":
        return "APP"
    flag = "--" + _kebab(name)
    singular = flag.removesuffix("s")
    return singular if singular in meta(name).get("aliases", ()) else flag


def flag_layer(values: dict[str, Any]) -> Layer:
    return Layer("flag", "command line", values, spell=_flag_name)


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
        "array": "a list",
    }.get(kind, kind or "a value")
    bounds = [
        f"{op} {schema[key]}"
        for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
        if key in schema
    ]
    return noun + (" " + " and ".join(bounds) if bounds else "")


def _describe(name: str, origins: dict[str, Layer | None]) -> str:
    """`--port='70000' (command line)`, or the default when no layer set it."""
    layer = origins.get(name)
    if layer is not None:
        return layer.describe(name)
    return unset(name, FIELDS[name].default)


# Error types whose message says what is expected; others are explained from the schema.
_SELF_EXPLAINED = {"value_error", "choice_not_installed"}


def _explain(exc: ValidationError, origins: dict[str, Layer | None]) -> str:
    properties = Settings.model_json_schema()["properties"]
    messages = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        ctx = error.get("ctx") or {}
        if name not in FIELDS:  # a whole-model rule: say where each clashing value came from
            involved = [n for n in ctx.get("fields") or [] if n in FIELDS]
            if ctx.get("subject") in FIELDS:  # one setting at fault, judged by the others
                subject, *involved = involved
                message = f"{_describe(subject, origins)}: {message}"
            got = " and ".join(_describe(n, origins) for n in involved)
            messages.append(f"{message}; got {got}" if got else message)
        elif error["type"] in _SELF_EXPLAINED:  # a field's own check explains itself
            messages.append(f"{_describe(name, origins)}: {message}")
        else:
            expected = _expected(properties[name])
            messages.append(f"{_describe(name, origins)}: expected {expected}")
    return "; ".join(dict.fromkeys(messages))


def _check_conflicts(origins: dict[str, Layer | None]) -> None:
    """Options that make no sense together when the user set both.

    A profile is a preset, not a choice: `--profile container --uds /run/app.sock` means
    "the container settings, on this socket", not a clash with the profile's host.
    """
    explicit = {
        name for name, layer in origins.items() if layer is not None and layer.source != "profile"
    }
    for socket_opt in ("uds", "fd"):
        for other in ("host", "port"):
            if socket_opt in explicit and other in explicit:
                a, b = origins[socket_opt], origins[other]
                assert a and b
                raise ConfigError(
                    f"{a.describe(socket_opt)} conflicts with {b.describe(other)}: "
                    f"a --{socket_opt} server does not bind --{other}"
                )


def _metrics_address_means_metrics(
    merged: dict[str, Any], origins: dict[str, Layer | None]
) -> None:
    """`--metrics-port 9100` alone turns metrics on: an address given is never ignored.

    Given together with an explicit `--no-metrics` (anywhere but a profile, which is a
    preset), the two contradict each other: an error naming both.
    """
    given = [
        (name, layer)
        for name in ("metrics_port", "metrics_host")
        if (layer := origins[name]) is not None and layer.source != "profile"
    ]
    if not given:
        return
    address, layer = given[0]
    switch = origins["metrics"]
    if switch is None or switch.source == "profile":
        merged["metrics"] = True
        where = f"{layer.where}, implied by {layer.spell(address)}"
        origins["metrics"] = Layer(layer.source, where, {"metrics": True}, spell=layer.spell)
    elif not _truthy(merged["metrics"]):
        raise ConfigError(
            f"{switch.describe('metrics')} contradicts {layer.describe(address)}: "
            "drop the metrics address, or turn metrics on"
        )


def _truthy(value: Any) -> bool:
    """A bool as the model will read it; an invalid one is left for the model to report."""
    if isinstance(value, str):
        return value.strip().lower() not in {"0", "false", "f", "no", "n", "off"}
    return bool(value)


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
    for flag, given in (("--profile", profile), ("--config", config_file)):
        if given is not None and not given.strip():  # `--profile "$UNSET"`: not "no profile"
            raise ConfigError(f"{flag}={given!r} (command line): expected a name or a file")
    config_by = ""  # who chose the config file and the profile, for error messages
    if not config_file and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = environ[ENV_PREFIX + "CONFIG"]
        config_by = f"{ENV_PREFIX}CONFIG={config_file!r} (environment)"
    file = file_layer(config_file, cwd, config_by)
    profile_by = ""
    if not profile and environ.get(ENV_PREFIX + "PROFILE"):
        profile = environ[ENV_PREFIX + "PROFILE"]
        profile_by = f"{ENV_PREFIX}PROFILE={profile!r} (environment)"
    if not profile and file is not None and file.profile is not None:
        if not isinstance(file.profile, str) or not file.profile:
            raise ConfigError(f"profile={file.profile!r} ({file.where}): expected a profile name")
        profile, profile_by = file.profile, f"profile={file.profile!r} ({file.where})"

    below = [profile_layer(profile, profile_by) if profile else None, file]
    above = [env_layer(environ), flag_layer(flags)]
    gunicorn, notes = gunicorn_layers(below, above, environ, cwd)
    layers = [*below, web_concurrency_layer(environ), *gunicorn, *above]
    merged: dict[str, Any] = {}
    origins: dict[str, Layer | None] = dict.fromkeys(FIELDS)
    for layer in filter(None, layers):
        for name, value in layer.values.items():
            merged[name] = value
            origins[name] = layer
    _check_conflicts(origins)
    _metrics_address_means_metrics(merged, origins)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origins)) from None
    return Loaded(
        as_values(settings),
        {name: layer.origin for name, layer in origins.items() if layer is not None},
        {name: layer.describe(name) for name, layer in origins.items() if layer is not None},
        profile,
        tuple(notes),
    )
