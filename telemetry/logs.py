"""Log lines of gateways and workers: plain text for a terminal, one JSON object per line for a log
pipeline (Kubernetes, Loki, Cloud Logging). A line about one request carries its request id and the
id of its trace, so a log line leads to the trace and back."""

import json
import logging
import time
from typing import Literal

from opentelemetry.trace import Span, format_trace_id

LogFormat = Literal["text", "json"]
_REQUEST_FIELDS = ("request_id", "trace_id")


def request_fields(request_id: str, span: Span) -> dict[str, str]:
    """`extra=` for a log call about one request."""
    context = span.get_span_context()
    return {
        "request_id": request_id,
        "trace_id": format_trace_id(context.trace_id) if context.is_valid else "",
    }


class TextFormatter(logging.Formatter):
    """The usual line, then ` request_id=… trace_id=…` when the record is about a request."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in _REQUEST_FIELDS if getattr(record, name, "")]
        return f"{line} {' '.join(fields)}" if fields else line


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _REQUEST_FIELDS:
            if getattr(record, name, ""):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, process: str, log_format: LogFormat) -> None:
    """Root logging for one process (`process` is "gateway" or "worker")."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
