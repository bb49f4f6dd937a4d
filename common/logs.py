"""Logging set-up for the daemons, and a limiter so a flood of bad input logs once per interval."""

from __future__ import annotations

import logging
import sys
import threading
import time


def setup_logging(level: str = "INFO", name: str = "saestream") -> logging.Logger:
    """One line per record on stderr, with a timestamp and the daemon's name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(name)


def shown(text: object, limit: int = 200) -> str:
    """A peer-supplied string as it may appear in a log line: as is when printable, else
    escaped (no forged lines, no terminal control codes), and cut at `limit` characters."""
    value = str(text)
    value = value if value.isprintable() else repr(value)[1:-1]
    return value if len(value) <= limit else value[:limit] + "…"


class RateLimitedLog:
    """Logs a message for a key at most once per `interval` seconds; counts what it suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg = f"{msg} ({suppressed} similar suppressed)"
        self.logger.log(level, msg, *args)
