"""What `conveyor monitor` shows, read from Redis (heartbeats, request streams) and from the gateways'
metrics pages. Reading never raises for a part of the fleet that is gone or unreachable: a worker
whose heartbeat expired simply is not listed, a page that does not answer is reported as such."""

import time
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
from google.protobuf.message import DecodeError
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from protos import jobs_pb2
from protos.redis_layout import GROUP, WORKER_STATUS_FIELD, StreamKeys
from telemetry.metrics import PREFIX

SCRAPED = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds")


@dataclass(frozen=True, slots=True)
class Histogram:
    """One Prometheus histogram: cumulative counts by upper bound, as on the page."""

    buckets: tuple[tuple[float, float], ...]
    count: float

    def minus(self, earlier: "Histogram") -> "Histogram":
        """What was observed since `earlier` (the same histogram scraped before)."""
        before = dict(earlier.buckets)
        return Histogram(
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets), self.count - earlier.count
        )

    def plus(self, other: "Histogram") -> "Histogram":
        """Both together: the same histogram scraped from two processes."""
        mine = dict(self.buckets)
        return Histogram(
            tuple((le, n + mine.get(le, 0.0)) for le, n in other.buckets), self.count + other.count
        )

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if le == float("inf"):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower


@dataclass(frozen=True, slots=True)
class GatewayView:
    status: jobs_pb2.GatewayStatus
    histograms: dict[str, Histogram]  # by name without the prefix; empty when unreachable
    scrape_error: str = ""


@dataclass(frozen=True, slots=True)
class StreamView:
    """One model's request stream and its consumer group."""

    model: str
    length: int  # jobs not yet acknowledged (workers delete a job when they acknowledge it)
    pending: int  # delivered to a worker and not yet acknowledged
    lag: int | None  # not yet delivered, as Redis 7 counts it; None on older servers
    consumers: int

    @property
    def unclaimed(self) -> int:
        return self.lag if self.lag is not None else max(self.length - self.pending, 0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_s: float  # time.time()
    workers: list[jobs_pb2.WorkerStatus] = field(default_factory=list)
    gateways: list[GatewayView] = field(default_factory=list)
    streams: list[StreamView] = field(default_factory=list)
    error: str = ""  # Redis unreachable: nothing else could be read


class FleetReader:
    """Reads snapshots of one namespace."""

    def __init__(self, client: redis.Redis, keys: StreamKeys, scrape_timeout_s: float = 2.0):
        self.client = client
        self.keys = keys
        self.scrape_timeout_s = scrape_timeout_s
        self._scrapers = ThreadPoolExecutor(8, thread_name_prefix="scrape")

    def close(self) -> None:
        self._scrapers.shutdown(wait=False, cancel_futures=True)

    def read(self) -> Snapshot:
        now = time.time()
        try:
            workers = [
                jobs_pb2.WorkerStatus.FromString(p) for p in self._values(self.keys.worker_pattern, True)
            ]
            statuses = [jobs_pb2.GatewayStatus.FromString(p) for p in self._values(self.keys.gateway_pattern)]
            streams = [self._stream(key) for key in self._keys(self.keys.requests_pattern)]
        except (RedisError, DecodeError) as error:
            return Snapshot(now, error=f"{type(error).__name__}: {error}")
        gateways = list(self._scrapers.map(self._scrape, statuses))
        return Snapshot(
            now,
            sorted(workers, key=lambda w: (w.model, w.worker_id)),
            sorted(gateways, key=lambda g: g.status.gateway_id),
            sorted(streams, key=lambda s: s.model),
        )

    def _keys(self, pattern: str) -> list[str]:
        return sorted(k.decode() for k in self.client.scan_iter(match=pattern, count=500))

    def _values(self, pattern: str, in_hash: bool = False) -> Iterable[bytes]:
        """The values under the keys that match; keys that expire between SCAN and GET are skipped."""
        keys = self._keys(pattern)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            if in_hash:
                pipe.hget(key, WORKER_STATUS_FIELD)
            else:
                pipe.get(key)
        return [value for value in pipe.execute() if value]

    def _stream(self, key: str) -> StreamView:
        model = self.keys.model_of(key)
        length = int(self.client.xlen(key))
        for group in self.client.xinfo_groups(key):
            if group["name"] in (GROUP, GROUP.encode()):
                lag = group.get("lag")
                return StreamView(
                    model,
                    length,
                    int(group["pending"]),
                    None if lag is None else int(lag),
                    int(group["consumers"]),
                )
        return StreamView(model, length, 0, length, 0)

    def _scrape(self, status: jobs_pb2.GatewayStatus) -> GatewayView:
        if not status.metrics_url:
            return GatewayView(status, {}, "no metrics page")
        try:
            with urllib.request.urlopen(status.metrics_url, timeout=self.scrape_timeout_s) as page:
                text = page.read().decode()
        except OSError as error:
            return GatewayView(status, {}, f"unreachable: {error}")
        return GatewayView(status, parse_histograms(text))


def parse_histograms(text: str, names: tuple[str, ...] = SCRAPED) -> dict[str, Histogram]:
    """The histograms named (by default, those the monitor shows), summed over their labels."""
    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(PREFIX)
        if family.type != "histogram" or name not in names:
            continue
        buckets: dict[float, float] = {}
        count = 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        found[name] = Histogram(tuple(sorted(buckets.items())), count)
    return found
