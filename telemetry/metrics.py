"""Prometheus metrics every process exposes: vLLM's names and buckets under the `conveyor:` prefix,
so dashboards and routers built for vLLM (an llm-d endpoint picker, say) read ours unchanged.

Workers export the engine gauges and counters; gateways the per-request histograms, timed as the
client sees them. Each process has its own registry and serves it on `/metrics`.
"""

import socket

from prometheus_client import CollectorRegistry, start_http_server

PREFIX = "conveyor:"

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Worker publish to gateway read: a Redis round trip and the gateway's reader turn.
TRANSIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def token_count_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length, as vLLM sizes its token histograms."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(value)
        scale *= 10


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `/metrics` from a daemon thread; returns the port (useful when asked for port 0)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


def metrics_url(host: str, port: int) -> str:
    """The address others reach this page at, for heartbeats: a wildcard bind is advertised by the
    address this host's name resolves to (a pod's IP in Kubernetes)."""
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = socket.gethostname()
    return f"http://{host}:{port}/metrics"
