"""Log output of every ``pricegate`` process: PRICEGATE_LOG_LEVEL, and PRICEGATE_LOG_FORMAT ``text`` or ``json``.

``text`` (the default) is ``<time> <LEVEL> <logger>: <message>`` for our loggers and uvicorn's own format for
uvicorn's. ``json`` is one object per line on stderr for every logger, uvicorn's and Python's warnings included:
``{"time": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "pricegate.gateway", "message": "..."}`` plus
``"exception"`` (the formatted traceback) when the record carries one, and ``"stack"`` for ``stack_info``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from shared.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn.Config installs its own handlers on these (uvicorn.config.LOGGING_CONFIG); in json mode they go to ours.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message or traceback are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(settings: Settings) -> None:
    """The root logger's level and handler (stderr) in the configured format. Like ``logging.basicConfig``, it
    leaves a root logger that already has handlers alone (a test runner's)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def adopt_uvicorn_loggers(settings: Settings) -> None:
    """In json mode, route uvicorn's loggers to ours. Call after ``uvicorn.Config`` was built: its constructor
    (re)installs uvicorn's own handlers and formats."""
    if settings.log_format != "json":
        return
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
