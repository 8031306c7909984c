"""Built-in environment profiles: TOML files beside this module, readable as examples."""

from __future__ import annotations

from pathlib import Path

from asgi_supervise.suggest import did_you_mean

HERE = Path(__file__).parent


class ProfileError(Exception):
    pass


def names() -> list[str]:
    return sorted(path.stem for path in HERE.glob("*.toml"))


def find_profile(name: str) -> Path:
    """A built-in name (`prod`) or a path to a user's own profile file."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ProfileError(f"profile file {name} does not exist")
        return path
    path = HERE / f"{name}.toml"
    if not path.is_file():
        hint = did_you_mean(name, names())
        raise ProfileError(f"unknown profile '{name}' (built-in: {', '.join(names())}){hint}")
    return path
