"""Telemetry: the one call a process makes at start for its logs, metrics and traces."""

import logging
from dataclasses import dataclass

import prometheus_client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from bootstrap.settings import TelemetrySettings
from telemetry.logs import configure_logging
from telemetry.otlp_metrics import MetricsOutlets
from telemetry.tracing import tracer_provider

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Telemetry:
    """One process's registry (its metrics register there), tracer, and where both go."""

    registry: CollectorRegistry
    tracer: Tracer
    page_url: str  # where others scrape /metrics; empty when the page is off
    _tracers: TracerProvider
    _outlets: MetricsOutlets

    @classmethod
    def start(cls, process: str, settings: TelemetrySettings) -> "Telemetry":
        """Logging first, then the /metrics page, OTLP metrics and the tracer (`process` is
        "gateway" or "worker")."""
        configure_logging(settings.log_level, process, settings.log_format)
        # No `*_created` series: vLLM exposes none, and scrapers built for it need none.
        prometheus_client.disable_created_metrics()
        registry = CollectorRegistry()
        service = f"conveyor-{process}"
        outlets = MetricsOutlets.open(
            registry,
            service,
            settings.metrics_host,
            settings.metrics_port,
            settings.otlp_endpoint,
            settings.otlp_metrics_interval_s,
        )
        logger.info("metrics on %s", outlets.page_url or "no page")
        tracers = tracer_provider(service, settings.otlp_endpoint)
        return cls(registry, tracers.get_tracer(f"conveyor.{process}"), outlets.page_url, tracers, outlets)

    def shutdown(self) -> None:
        """Flush the spans still batched and push the last metrics."""
        self._tracers.shutdown()
        self._outlets.shutdown()
