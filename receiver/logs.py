"""One structured line per event: JSON off a terminal, readable on one (RECEIVER_LOG_FORMAT chooses).

Call sites pass facts as keyword fields: `event(log, "callback accepted", task_id=…, provider=…)`.
Secrets never reach a line: callers log ids, hosts and counts, never keys, tokens or URLs (a path or a
query string can carry a signature); `url_host` keeps only the host and port of a URL, and the formatter
drops any field whose name says it holds a secret.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any
from typing import TextIO
from urllib.parse import urlsplit

FIELDS = "receiver_fields"
SECRET_WORDS = ("key", "secret", "token", "signature", "password", "authorization")


def event(logger: logging.Logger, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` with structured fields (task_id, provider, status …)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={FIELDS: fields})


def url_host(url: str) -> str:
    """The host of a URL (and its port, when it names one) for a log line's `host=`: no user, no path,
    no query string (signed links carry their signature there)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(a URL that cannot be read)"
    host = parts.hostname or "(none)"
    if len(host) > 80:
        host = host[:77] + "..."
    if ":" in host:  # an IPv6 address, bracketed as in a URL so that the port stays apart
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    raw = getattr(record, FIELDS, {})
    return {k: v for k, v in raw.items() if v is not None and not any(w in k.lower() for w in SECRET_WORDS)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ReadableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up the root logger once: `fmt` is json, text, or auto (text on a terminal, JSON elsewhere)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ReadableFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request with its full URL (signed links included) at INFO: keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
