"""systemd's notify protocol: READY, RELOADING, STOPPING, STATUS and the watchdog.

With `Type=notify-reload` (or `notify`) systemd then knows when the service really serves,
when a reload is under way and when it is draining. Nothing happens without NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import suppress


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() else None
        self.last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> None:
        if not self.enabled:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        # systemd gone or its socket unwritable: never fatal for the app.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, suppress(OSError):
            sock.sendto(message.encode(), self.address)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1, status="draining")

    def watchdog(self, now: float) -> None:
        """Called from the master's loop, so a wedged master stops pinging and is restarted."""
        if self.watchdog_interval is not None and now - self.last_ping >= self.watchdog_interval:
            self.last_ping = now
            self.send(watchdog=1)
