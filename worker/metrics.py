"""Worker metrics with vLLM's meanings, for routers and dashboards: what every worker reports
(StepMetrics) and a generation worker's KV cache and scheduler besides (GenerationMetrics)."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from scheduler import Scheduler
from telemetry.metrics import ITERATION_TOKENS_BUCKETS, PREFIX


class StepMetrics:
    """Requests running and waiting, and the size of every engine step; scraped from `/metrics`."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        labels = ["model_name"]
        self.running = Gauge(
            f"{PREFIX}num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=registry,
        ).labels(model_name)
        self.waiting = Gauge(
            f"{PREFIX}num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=registry,
        ).labels(model_name)
        self.iteration_tokens = Histogram(
            f"{PREFIX}iteration_tokens_total",
            "Histogram of number of tokens per engine step.",
            labels,
            buckets=ITERATION_TOKENS_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.batch_size = Histogram(
            f"{PREFIX}iteration_batch_size",
            "Histogram of number of sequences per engine step.",
            labels,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        ).labels(model_name)

    def observe_step(self, num_tokens: int, num_seqs: int) -> None:
        """One engine step ran `num_seqs` sequences (or inputs) over `num_tokens` tokens."""
        self.iteration_tokens.observe(num_tokens)
        self.batch_size.observe(num_seqs)


class GenerationMetrics(StepMetrics):
    """Besides the step metrics: KV-cache usage, preemptions, prefix-cache hits and drafted tokens."""

    def __init__(self, registry: CollectorRegistry, model_name: str, scheduler: Scheduler):
        super().__init__(registry, model_name)
        labels = ["model_name"]
        self._scheduler = scheduler
        self.kv_usage = Gauge(
            f"{PREFIX}kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels,
            registry=registry,
        ).labels(model_name)
        config = scheduler.config
        Gauge(
            f"{PREFIX}cache_config_info",
            "Information of the KV cache configuration.",
            ["model_name", "block_size", "num_blocks", "enable_prefix_caching"],
            registry=registry,
        ).labels(
            model_name, str(config.block_size), str(config.num_blocks), str(config.enable_prefix_caching)
        ).set(1)
        pool = scheduler.block_manager
        # Counters that follow the scheduler's own cumulative counts, from now: a warm-up before
        # serving is not traffic.
        self._followed = [
            _Followed(
                Counter(f"{PREFIX}{name}", help_text, labels, registry=registry).labels(model_name), read
            )
            for name, help_text, read in (
                ("num_preemptions", "Cumulative number of preemptions.", lambda: scheduler.num_preemptions),
                (
                    "prefix_cache_queries",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    lambda: pool.num_queried_tokens,
                ),
                (
                    "prefix_cache_hits",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    lambda: pool.num_hit_tokens,
                ),
                (
                    "spec_decode_num_draft_tokens",
                    "Speculative decoding: tokens drafted and checked.",
                    lambda: scheduler.num_draft_tokens,
                ),
                (
                    "spec_decode_num_accepted_tokens",
                    "Speculative decoding: drafted tokens the model agreed with.",
                    lambda: scheduler.num_accepted_tokens,
                ),
            )
        ]

    def observe_step(self, num_tokens: int, num_seqs: int) -> None:
        super().observe_step(num_tokens, num_seqs)
        self.refresh()

    def refresh(self) -> None:
        """Gauges from the scheduler now; counters by what grew since the last refresh."""
        scheduler = self._scheduler
        pool = scheduler.block_manager
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(pool.num_used_blocks / pool.num_blocks)
        for followed in self._followed:
            followed.refresh()


class _Followed:
    """A Prometheus counter that follows a count kept elsewhere, from its value when made."""

    def __init__(self, counter: Counter, read: Callable[[], int]):
        self._counter, self._read = counter, read
        self._seen = read()

    def refresh(self) -> None:
        now = self._read()
        self._counter.inc(now - self._seen)
        self._seen = now
