"""The validated settings as plain data, and where each came from: what a master runs on.

The settings model (`settings.py`) checks every layer; what it passed travels as plain
values (`Values`) with the words its errors need (`Loaded`). A master keeps only these:
it has its settings read in a forked child (`reader.py`), so it never imports pydantic,
whose modules and built model are ~14 MB of a process's own memory (docs/benchmarks.md).
Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asgi_supervise import drain
from asgi_supervise.worker import apploader

# scheme://user:password@host, and scheme://:password@host (Redis URLs have no user).
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?P<tail>@)")


class ConfigError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def hide(value: Any, secret: bool) -> Any:
    """A value fit to print: all of a secret one, and passwords inside URLs anywhere."""
    if value is None:
        return None
    if secret:
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>***\g<tail>", value)
    if isinstance(value, list):
        return [hide(item, secret) for item in value]
    return value


def unset(name: str, default: Any) -> str:
    """A setting no layer set, for a message: `backlog=2048 (default)`."""
    return f"{name} not set" if default is None else f"{name}={default!r} (default)"


class Values:
    """Every setting's validated value, read like the model (`values.port`), immutable.

    It answers `model_copy(update=...)` and `model_dump()` as the model does, so what
    takes settings takes either.
    """

    __slots__ = ("_secret", "_values")
    _values: dict[str, Any]
    _secret: frozenset[str]

    def __init__(self, values: Mapping[str, Any], secret: Iterable[str] = ()) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_secret", frozenset(secret))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are immutable: model_copy(update=...) makes new ones")

    def __reduce__(self) -> tuple[type[Values], tuple[dict[str, Any], frozenset[str]]]:
        return Values, (self._values, self._secret)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Values) and self._values == other._values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={self.hidden(name)!r}" for name in self._values)
        return f"Values({shown})"

    @property
    def names(self) -> tuple[str, ...]:
        """Every setting, in the model's order."""
        return tuple(self._values)

    def model_copy(self, *, update: Mapping[str, Any]) -> Values:
        unknown = set(update) - set(self._values)
        if unknown:
            raise AttributeError(f"no setting {sorted(unknown)[0]!r}")
        return Values({**self._values, **update}, self._secret)

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        """A copy of every value; they are JSON's types already (str, number, bool, list)."""
        return {name: list(v) if isinstance(v, list) else v for name, v in self._values.items()}

    def hidden(self, name: str, value: Any = ...) -> Any:
        """A setting's value (or `value` for that setting) fit to print."""
        return hide(self._values[name] if value is ... else value, name in self._secret)


@dataclass(frozen=True)
class Loaded:
    """The settings and, for every one a layer set, where (`origins`: "env: environment")
    and how the user wrote it (`given`: "--port='8000' (command line)"), for messages."""

    settings: Values
    origins: dict[str, str] = field(default_factory=dict)  # absent: the built-in default
    given: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    notes: tuple[str, ...] = ()  # warnings: gunicorn settings with no equivalent

    def origin(self, name: str) -> str:
        return self.origins.get(name, "default")

    def describe(self, name: str) -> str:
        """The setting as the user gave it, or its default, to start an error message."""
        if name in self.given:
            return self.given[name]
        return unset(name, getattr(self.settings, name))

    def check_app(self) -> None:
        """The app string well formed and its module found, or a ConfigError naming where
        it was given: checked before any worker imports it, at start and on a reload."""
        try:
            apploader.check(self.settings.app or "", self.settings.app_dir)
        except apploader.AppStringError as exc:
            raise ConfigError(f"{self.describe('app')}: {exc.detail}") from None

    def document(self) -> dict[str, Any]:
        """Every setting's value (secrets redacted) and source, and the drain they make:
        what `config --json` prints, and what a running master answers `config --running`."""
        settings = self.settings
        rows = {
            name: {"value": settings.hidden(name), "source": self.origin(name)}
            for name in settings.names
        }
        drain_times = drain.of(self.settings).to_dict()
        return {"profile": self.profile, "settings": rows, "drain": drain_times}
