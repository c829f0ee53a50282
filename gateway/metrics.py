"""GatewayMetrics: per-request histograms and counters with vLLM's names and buckets, timed as the
client sees them (from the request's arrival at this gateway)."""

from prometheus_client import CollectorRegistry, Counter, Histogram

from protos import inference_pb2
from telemetry.metrics import (
    INTER_TOKEN_BUCKETS,
    PREFIX,
    REQUEST_LATENCY_BUCKETS,
    TRANSIT_BUCKETS,
    TTFT_BUCKETS,
    token_count_buckets,
)

_FINISHED_REASON = {  # vLLM's label values
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "abort",
}


APIS = ("grpc", "openai")  # the `api` label: which front a request came through


class GatewayMetrics:
    """The metric families, created once in the gateway's registry; `model()` gives one model's
    series for one API."""

    def __init__(self, registry: CollectorRegistry, max_model_len: int):
        labels = ["model_name", "api"]
        tokens = token_count_buckets(max_model_len)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}{name}", doc, labels, registry=registry)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent queued before a worker took the request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens_request = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self.generation_tokens_request = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", tokens
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.response_transit = Histogram(
            f"{PREFIX}response_transit_seconds",
            "Histogram of time from a worker publishing a batch of tokens to this gateway reading it.",
            buckets=TRANSIT_BUCKETS,
            registry=registry,
        )
        self.success = Counter(
            f"{PREFIX}request_success",
            "Count of successfully processed requests.",
            ["model_name", "api", "finished_reason"],
            registry=registry,
        )

    def model(self, model_name: str) -> dict[str, "ModelMetrics"]:
        """One model's series, by API."""
        return {api: ModelMetrics(self, model_name, api) for api in APIS}


class ModelMetrics:
    """One model's series of every family, for the requests of one API."""

    def __init__(self, families: GatewayMetrics, model_name: str, api: str):
        labels = (model_name, api)
        self.ttft = families.ttft.labels(*labels)
        self.inter_token = families.inter_token.labels(*labels)
        self.e2e = families.e2e.labels(*labels)
        self.queue_time = families.queue_time.labels(*labels)
        self.prompt_tokens_request = families.prompt_tokens_request.labels(*labels)
        self.generation_tokens_request = families.generation_tokens_request.labels(*labels)
        self.prompt_tokens = families.prompt_tokens.labels(*labels)
        self.generation_tokens = families.generation_tokens.labels(*labels)
        self._success = families.success
        self._labels = labels

    def finished(self, response: inference_pb2.GenerateResponse) -> None:
        """A request ended with a finish reason; its timings and usage are in the last frame (its time
        to first token was observed when that token came)."""
        timings, usage = response.timings, response.usage
        self.e2e.observe(timings.total_s)
        self.queue_time.observe(timings.queued_s)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.prompt_tokens_request.observe(usage.prompt_tokens)
        self.generation_tokens_request.observe(usage.completion_tokens)
        reason = _FINISHED_REASON.get(response.finish_reason)
        if reason is not None:
            self._success.labels(*self._labels, reason).inc()

    def embedded(self, response: inference_pb2.EmbedResponse) -> None:
        """An embedding call answered: its latency, queue time and tokens (its reason is "stop")."""
        self.e2e.observe(response.timings.total_s)
        self.queue_time.observe(response.timings.queued_s)
        self.prompt_tokens.inc(response.usage.prompt_tokens)
        self.prompt_tokens_request.observe(response.usage.prompt_tokens)
        self._success.labels(*self._labels, "stop").inc()
