"""Log lines: request and trace ids appended to text lines, and as fields of JSON lines."""

import json
import logging

from opentelemetry.trace import NonRecordingSpan, SpanContext

from telemetry.logs import JsonFormatter, TextFormatter, request_fields

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def record(**extra: str) -> logging.LogRecord:
    entry = logging.LogRecord("conveyor.test", logging.INFO, __file__, 1, "job %s", ("done",), None)
    entry.__dict__.update(extra)
    return entry


def test_request_fields_name_the_trace_of_the_span() -> None:
    span = NonRecordingSpan(SpanContext(TRACE_ID, 0x00F067AA0BA902B7, is_remote=False))
    assert request_fields("r1", span) == {"request_id": "r1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}


def test_text_lines_end_with_the_ids_when_about_a_request() -> None:
    formatter = TextFormatter("%(levelname)s %(message)s")
    assert formatter.format(record()) == "INFO job done"
    assert (
        formatter.format(record(request_id="r1", trace_id="ab")) == "INFO job done request_id=r1 trace_id=ab"
    )


def test_json_lines_are_one_object_with_the_ids() -> None:
    line = JsonFormatter("worker").format(record(request_id="r1", trace_id="ab"))
    entry = json.loads(line)
    assert entry["message"] == "job done" and entry["process"] == "worker" and entry["level"] == "INFO"
    assert entry["request_id"] == "r1" and entry["trace_id"] == "ab"
    assert entry["time"].endswith("Z")
    assert "request_id" not in json.loads(JsonFormatter("worker").format(record()))
