"""Log output for opkeeper's processes: text for people, JSON lines for log pipelines.

One place, so the controller and the gateway (and each gateway worker) write the same
fields: ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``, ``process``, plus
every ``extra={...}`` field of the call (operation, id, from, to, reason...).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
"""The values of ``--log-format``."""

DEFAULT_FORMAT = "text"
"""What a process writes unless told otherwise (the Helm chart sets json)."""

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the ``extra={...}`` fields of the call as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(*, level: str, fmt: str) -> None:
    """Log to stderr at ``level`` in ``fmt`` (one of :data:`FORMATS`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
