"""`/metrics` on a live gateway and worker: vLLM's names, with counts that match what was sent."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from client.library import ConveyorClient
from telemetry.metrics import TTFT_BUCKETS
from tests.e2e.cluster import wait_for
from tests.e2e.conftest import Cluster

MAX_TOKENS = 6
LABELS = {"model_name": "smollm2-135m-instruct"}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the page, keyed by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """A worker's sample, or a gateway's for its gRPC requests (the gateway labels them by API)."""
    for api in ({"api": "grpc"}, {}):
        key = (name, tuple(sorted({**LABELS, **api, **labels}.items())))
        if key in samples:
            return samples[key]
    return 0.0


def test_metrics_pages_count_what_was_served(cluster: Cluster) -> None:
    gateway_before, worker_before = scrape(cluster.gateway_metrics), scrape(cluster.worker_metrics)
    prompt_tokens = 0
    with ConveyorClient(cluster.address) as client:
        for prompt in ("One", "Two words", "Three short words"):
            completion = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            assert len(completion.token_ids) == MAX_TOKENS
            prompt_tokens += completion.prompt_tokens
    gateway, worker = scrape(cluster.gateway_metrics), scrape(cluster.worker_metrics)

    def grew(samples: dict, before: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return value(samples, name, **labels) - value(before, name, **labels)

    for histogram in (
        "conveyor:time_to_first_token_seconds",
        "conveyor:e2e_request_latency_seconds",
        "conveyor:request_queue_time_seconds",
    ):
        assert grew(gateway, gateway_before, f"{histogram}_count") == 3, histogram
        assert grew(gateway, gateway_before, f"{histogram}_bucket", le="+Inf") == 3, histogram
    # One token per frame: every token after a request's first is one inter-token interval.
    assert grew(gateway, gateway_before, "conveyor:inter_token_latency_seconds_count") == 3 * (MAX_TOKENS - 1)
    assert grew(gateway, gateway_before, "conveyor:request_success_total", finished_reason="length") == 3
    assert grew(gateway, gateway_before, "conveyor:generation_tokens_total") == 3 * MAX_TOKENS
    assert grew(gateway, gateway_before, "conveyor:prompt_tokens_total") == prompt_tokens
    assert grew(gateway, gateway_before, "conveyor:time_to_first_token_seconds_bucket", le="2560.0") == 3

    assert value(worker, "conveyor:num_requests_running") == 0
    assert value(worker, "conveyor:num_requests_waiting") == 0
    assert 0.0 <= value(worker, "conveyor:kv_cache_usage_perc") <= 1.0
    config = [k for k in worker if k[0] == "conveyor:cache_config_info"]
    assert len(config) == 1 and dict(config[0][1])["block_size"] == "16" and worker[config[0]] == 1
    assert grew(worker, worker_before, "conveyor:prefix_cache_queries_total") == prompt_tokens
    assert grew(worker, worker_before, "conveyor:iteration_tokens_total_count") >= MAX_TOKENS
    assert "conveyor:num_preemptions_total" in {k[0] for k in worker}
    assert grew(worker, worker_before, "conveyor:spec_decode_num_draft_tokens_total") == 0  # off by default


def test_the_same_metrics_go_out_by_otlp(cluster: Cluster) -> None:
    with ConveyorClient(cluster.address) as client:
        client.generate("By OTLP", max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    page = scrape(cluster.gateway_metrics)
    sent = value(page, "conveyor:time_to_first_token_seconds_count")
    collector = cluster.collector

    def ttft_count() -> int:
        metric = collector.metric("conveyor-gateway", "conveyor.time_to_first_token_seconds")
        return sum(p.count for p in metric.histogram.data_points) if metric else -1

    assert wait_for(lambda: ttft_count() >= sent, timeout_s=15), ttft_count()
    metric = collector.metric("conveyor-gateway", "conveyor.time_to_first_token_seconds")
    assert metric is not None and metric.unit == "s"
    # One series per served model and API; the generator's gRPC one is what this request added to.
    grpc_labels = {**LABELS, "api": "grpc"}
    (point,) = [
        p
        for p in metric.histogram.data_points
        if {a.key: a.value.string_value for a in p.attributes} == grpc_labels
    ]
    assert list(point.explicit_bounds) == list(TTFT_BUCKETS)
    assert sum(point.bucket_counts) == point.count
    assert wait_for(lambda: collector.metric("conveyor-worker", "conveyor.kv_cache_usage_perc"), timeout_s=15)
    tokens = collector.metric("conveyor-gateway", "conveyor.generation_tokens")
    assert (
        tokens is not None
        and tokens.sum.is_monotonic
        and max(p.as_double for p in tokens.sum.data_points) >= MAX_TOKENS
    )
