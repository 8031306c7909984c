"""The one "did you mean" hint: flags, settings, environment variables and profile names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(
    word: str,
    known: Iterable[str],
    spell: Callable[[str], str] = "'{}'".format,
) -> str:
    """`; did you mean 'x'?` for the closest of `known`, spelled by `spell`; else ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {spell(close[0])}?" if close else ""
