"""How many workers: what the machine allows (`host`, which reads it) and what that means
for the worker count (`budgets`, pure decisions over `facts`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from asgi_supervise.sizing.budgets import (
    Budget,
    Plan,
    db_share,
    over_budgets,
    plan,
    reload_room,
    usable_cpus,
)
from asgi_supervise.sizing.host import read_host

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings

__all__ = [
    "Budget",
    "Plan",
    "db_share",
    "make_plan",
    "over_budgets",
    "plan",
    "reload_room",
    "usable_cpus",
]


def make_plan(settings: Settings, root: Path = Path("/")) -> Plan:
    """The plan for this machine: the one call here that reads it."""
    return plan(settings, read_host(root))
