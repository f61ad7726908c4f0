"""Logging set-up: readable lines for people, or one JSON object a line for machines (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus

_QUERY_PAIR = re.compile(r"([?&;])([^=&;\s\"'?]+)=([^&;\s\"']*)")
_SECRET_NAMES = ("key", "token", "secret", "password")


def _redact_pair(match: re.Match[str]) -> str:
    sep, name, value = match.groups()
    decoded = unquote_plus(name).lower()  # api%5Fkey authenticates as api_key: it is hidden like it
    if value and any(word in decoded for word in _SECRET_NAMES):
        return f"{sep}{name}=[redacted]"
    return match.group(0)


def redact(message: str) -> str:
    """The message with the value of every query parameter whose decoded name says key or token hidden."""
    return _QUERY_PAIR.sub(_redact_pair, message) if "=" in message else message


class RedactKeys(logging.Filter):
    """Hides ``?api_key=...`` (however its name is spelled or encoded) in any log line: uvicorn logs WebSocket and
    HTTP paths with their query."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> None:
    """``fmt`` is ``text`` or ``json``; uvicorn's own loggers go through the same handler."""
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
