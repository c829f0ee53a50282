"""RequestTrace: one request's spans at the gateway, around the job that carries its context on."""

from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from telemetry.tracing import inject


@dataclass(slots=True)
class RequestTrace:
    """The root span of a request (a child of the caller's, if its metadata carried one) and its
    children. Spans are passed explicitly, never made current: a streaming handler yields between
    them, and a context attached before a yield cannot be detached after it."""

    tracer: Tracer
    root: Span

    @classmethod
    def start(cls, tracer: Tracer, name: str, parent: Context, **attributes: str) -> "RequestTrace":
        """`name` is the call's: conveyor.generate or conveyor.embed."""
        root = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return cls(tracer, root)

    @property
    def context(self) -> Context:
        return trace.set_span_in_context(self.root)

    def child(self, name: str) -> Span:
        """A span that ends when its `with` block does."""
        return self.tracer.start_span(name, context=self.context)

    def interval(self, name: str, start_s: float, end_s: float) -> None:
        """A span for something measured rather than wrapped (Unix seconds)."""
        span = self.tracer.start_span(name, context=self.context, start_time=int(start_s * 1e9))
        span.end(end_time=int(end_s * 1e9))

    def carry(self, carrier: dict[str, str]) -> None:
        """Write the trace context into a job, for the worker's spans."""
        inject(carrier, self.context)

    def end(self, error: str | None = None) -> None:
        if error is not None:
            self.root.set_status(Status(StatusCode.ERROR, error))
        self.root.end()
