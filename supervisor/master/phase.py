"""The master's phase: what the loop is doing, for the arbiter and the operators' commands."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"  # SIGTERM: readiness off, keep serving for the drain delay, then stop
    STOPPING = "stopping"  # stop now: SIGQUIT or a second SIGTERM/SIGINT
