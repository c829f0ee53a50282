"""OpenTelemetry tracing for gateways and workers: one trace per request across both processes.

The gateway's context travels inside the Job (W3C `traceparent` in `Job.trace_context`), so the
worker's spans (queue wait, prefill, decode) join the trace the gateway started, or the caller's
when its gRPC metadata carried one. Spans go out by OTLP when an endpoint is configured.
"""

from collections.abc import Mapping, MutableMapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(service_name: str, otlp_endpoint: str) -> TracerProvider:
    """Every request is traced (ids for logs); spans leave the process only with an endpoint."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    return provider


def inject(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    _PROPAGATOR.inject(carrier, context)


def extract(carrier: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract(carrier)
