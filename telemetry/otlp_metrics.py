"""OtlpMetricsPusher: the Prometheus registry of a process, pushed by OTLP as well.

One set of instruments feeds both outputs, so `/metrics` and the OTLP stream never disagree. OTel
instrument names cannot contain ':', so `conveyor:time_to_first_token_seconds` goes out as
`conveyor.time_to_first_token_seconds` (a collector's Prometheus exporter turns it into
`conveyor_time_to_first_token_seconds`). Counters become cumulative monotonic sums, gauges gauges,
histograms explicit-bucket histograms with the same bounds.
"""

import threading
import time
from dataclasses import dataclass, field

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric as PrometheusFamily

from telemetry.metrics import PREFIX, metrics_url, serve_metrics

_SCOPE = InstrumentationScope("conveyor")


def otel_name(prometheus_name: str) -> str:
    return prometheus_name.replace(":", ".")


class OtlpMetricsPusher:
    """Exports the registry every `interval_s` from a daemon thread, and once more on `shutdown`."""

    def __init__(
        self, registry: CollectorRegistry, service_name: str, exporter: MetricExporter, interval_s: float
    ):
        self.registry = registry
        self.exporter = exporter
        self.interval_s = interval_s
        self.resource = Resource.create({"service.name": service_name})
        self.start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    @classmethod
    def to_endpoint(
        cls, registry: CollectorRegistry, service_name: str, endpoint: str, interval_s: float
    ) -> "OtlpMetricsPusher":
        return cls(registry, service_name, OTLPMetricExporter(endpoint=endpoint, insecure=True), interval_s)

    def start(self) -> "OtlpMetricsPusher":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join()
        self.exporter.export(self.collect())
        self.exporter.shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.exporter.export(self.collect())

    def collect(self) -> MetricsData:
        now = time.time_ns()
        metrics = [
            metric
            for family in self.registry.collect()
            if family.name.startswith(PREFIX)
            for metric in [self._convert(family, now)]
            if metric is not None
        ]
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(_SCOPE, metrics, "")], "")])

    def _convert(self, family: PrometheusFamily, now: int) -> Metric | None:
        name, doc = otel_name(family.name), family.documentation
        if family.type == "counter":
            points = [
                NumberDataPoint(s.labels, self.start_ns, now, s.value)
                for s in family.samples
                if s.name.endswith("_total")
            ]
            return Metric(name, doc, "", Sum(points, AggregationTemporality.CUMULATIVE, True))
        if family.type == "gauge":
            return Metric(
                name, doc, "", Gauge([NumberDataPoint(s.labels, 0, now, s.value) for s in family.samples])
            )
        if family.type == "histogram":
            return Metric(name, doc, "s" if name.endswith("_seconds") else "", self._histogram(family, now))
        return None

    def _histogram(self, family: PrometheusFamily, now: int) -> Histogram:
        series: dict[tuple[tuple[str, str], ...], _Series] = {}
        for sample in family.samples:
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            entry = series.setdefault(key, _Series())
            if sample.name.endswith("_bucket"):
                entry.buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                entry.total = sample.value
        points = []
        for key, entry in series.items():
            bounds = sorted(entry.buckets)
            cumulative = [n for _, n in bounds]
            points.append(
                HistogramDataPoint(
                    dict(key),
                    self.start_ns,
                    now,
                    count=int(cumulative[-1]) if cumulative else 0,
                    sum=entry.total,
                    bucket_counts=[
                        int(n - b) for n, b in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)
                    ],
                    explicit_bounds=[le for le, _ in bounds[:-1]],  # the last bucket is +Inf
                    min=None,  # type: ignore[arg-type]  # Prometheus keeps no min or max: left unset
                    max=None,  # type: ignore[arg-type]
                )
            )
        return Histogram(points, AggregationTemporality.CUMULATIVE)


@dataclass(slots=True)
class _Series:
    """One label set of a Prometheus histogram: cumulative counts by upper bound, and the sum."""

    buckets: list[tuple[float, float]] = field(default_factory=list)
    total: float = 0.0


@dataclass(slots=True)
class MetricsOutlets:
    """Where a process's registry goes: its `/metrics` page (url empty when off) and OTLP (if set)."""

    page_url: str
    pusher: OtlpMetricsPusher | None

    @classmethod
    def open(
        cls,
        registry: CollectorRegistry,
        service_name: str,
        host: str,
        port: int,
        otlp_endpoint: str,
        otlp_interval_s: float,
    ) -> "MetricsOutlets":
        """Serve the page unless `port` is -1; push by OTLP when an endpoint is given."""
        page_url = metrics_url(host, serve_metrics(registry, host, port)) if port >= 0 else ""
        pusher = None
        if otlp_endpoint:
            pusher = OtlpMetricsPusher.to_endpoint(
                registry, service_name, otlp_endpoint, otlp_interval_s
            ).start()
        return cls(page_url, pusher)

    def shutdown(self) -> None:
        """The last figures go out by OTLP (the page ends with the process)."""
        if self.pusher is not None:
            self.pusher.shutdown()
