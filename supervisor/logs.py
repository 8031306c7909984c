"""One log format for master, workers and access lines: text for people, JSON for collectors."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import sys
import time
from typing import Any, ClassVar

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)-7s %(message)s"
# Attributes every LogRecord has; anything else was passed in `extra=` and is kept.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with `extra=` fields (worker, slot, reason) kept as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            client, method, path, version, status = record.args
            entry.update(
                client=client, method=method, path=path, http_version=version, status=status
            )
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ColourFormatter(logging.Formatter):
    """Text lines with the level coloured, for a terminal (the dev profile)."""

    COLOURS: ClassVar[dict[str, int]] = {
        "DEBUG": 36,
        "INFO": 32,
        "WARNING": 33,
        "ERROR": 31,
        "CRITICAL": 41,
    }

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        colour = self.COLOURS.get(record.levelname)
        name = record.levelname
        return line.replace(name, f"\x1b[{colour}m{name}\x1b[0m", 1) if colour else line


def dict_config(
    log_format: str,
    level: str,
    access_log: bool,
    log_file: str | None = None,
    use_colors: bool | None = None,
) -> dict[str, Any]:
    """logging.config dict used by master and workers alike (uvicorn loggers included)."""
    level = "DEBUG" if level == "trace" else level.upper()
    colour = use_colors if use_colors is not None else (not log_file and sys.stderr.isatty())
    formatter: dict[str, Any] = {"format": TEXT_FORMAT, "datefmt": "%Y-%m-%d %H:%M:%S"}
    if log_format == "json":
        formatter = {"()": JSONFormatter}
    elif colour:
        formatter["()"] = ColourFormatter
    handler: dict[str, Any] = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    if log_file:  # append: master and workers share the file, one line per write
        handler = {"class": "logging.FileHandler", "filename": log_file, "formatter": "default"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "asgi_supervise": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {
                "handlers": ["default"],
                "level": "INFO" if access_log else "WARNING",
                "propagate": False,
            },
        },
    }


_applied: tuple[Any, ...] | None = None  # what this process's logging was last set up with


def configure(
    log_format: str,
    level: str,
    access_log: bool = True,
    log_file: str | None = None,
    use_colors: bool | None = None,
    log_config: str | None = None,
) -> None:
    """Set up logging. What this process already has is not set up again: a worker forked
    from a fork server (or a gunicorn master) that did it keeps the inherited handlers,
    where `dictConfig` would build them anew and copy ~0.5 MB of shared pages per worker.
    A log file is opened again, though: it may have been rotated since (SIGUSR1 reopens
    the master's and the workers', not a fork server's). A `log_config` file is always
    read again: it may have changed since."""
    global _applied
    key = (log_format, level, access_log, log_file, use_colors)
    if log_config is None and key == _applied:
        if log_file:
            reopen()
        return
    _applied = None
    if log_config:
        load_config_file(log_config)
    else:
        logging.config.dictConfig(dict_config(log_format, level, access_log, log_file, use_colors))
        _applied = key


def load_config_file(path: str) -> None:
    """--log-config, read the way uvicorn reads it, so master and workers log alike."""
    if path.endswith(".json"):
        with open(path) as fh:
            logging.config.dictConfig(json.load(fh))
    elif path.endswith((".yaml", ".yml")):
        import yaml  # PyYAML comes with uvicorn[standard]

        with open(path) as fh:
            logging.config.dictConfig(yaml.safe_load(fh))
    else:
        logging.config.fileConfig(path, disable_existing_loggers=False)


def reopen() -> None:
    """Reopen every log file (after logrotate moved it): SIGUSR1."""
    names = ["", "asgi_supervise", "uvicorn", "uvicorn.access", "uvicorn.error"]
    handlers = {h for name in names for h in logging.getLogger(name).handlers}
    for handler in handlers:
        if isinstance(handler, logging.FileHandler):
            with handler.lock or contextlib.nullcontext():
                handler.close()
                handler.stream = handler._open()


def say(message: str) -> None:
    """A user-facing error line for the CLI, before logging exists."""
    print(f"asgi-supervise: {message}", file=sys.stderr)


def emit(text: str) -> None:
    """Print command output; a reader that stops early (`| head`) is not an error."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
