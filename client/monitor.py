"""`conveyor monitor`: a live terminal dashboard of one namespace — workers, request streams,
gateways, and the recent request rate and latencies."""

import time
from collections import deque
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bootstrap.redis import connect
from bootstrap.settings import RedisSettings
from client.fleet_snapshot import FleetReader, GatewayView, Histogram, Snapshot
from protos import jobs_pb2
from protos.redis_layout import StreamKeys


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    redis_url: str
    namespace: str = "conveyor"
    interval_s: float = 1.0
    window_s: float = 60.0  # rates and latency percentiles cover this much recent time
    once: bool = False  # print one frame (two readings `interval_s` apart) and exit


class FleetHistory:
    """The snapshots of the last `window_s` seconds: rates are differences across the window."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._snapshots: deque[Snapshot] = deque()

    def add(self, snapshot: Snapshot) -> None:
        self._snapshots.append(snapshot)
        while len(self._snapshots) > 2 and snapshot.taken_s - self._snapshots[1].taken_s >= self.window_s:
            self._snapshots.popleft()

    @property
    def latest(self) -> Snapshot:
        return self._snapshots[-1]

    def tokens_per_s(self, worker: jobs_pb2.WorkerStatus) -> float | None:
        """Generated tokens per second by this worker over the window, from its heartbeats."""
        for earlier in self._snapshots:
            for before in earlier.workers:
                if before.worker_id == worker.worker_id and before.updated_unix_ms < worker.updated_unix_ms:
                    seconds = (worker.updated_unix_ms - before.updated_unix_ms) / 1000
                    return (worker.generation_tokens - before.generation_tokens) / seconds
        return None

    def recent(self, gateway: GatewayView, name: str) -> tuple[Histogram | None, float]:
        """The histogram's observations over the window, and the seconds it covers."""
        now = gateway.histograms.get(name)
        if now is None:
            return None, 0.0
        for earlier in self._snapshots:
            for before in earlier.gateways:
                if before.status.gateway_id == gateway.status.gateway_id and name in before.histograms:
                    seconds = self.latest.taken_s - earlier.taken_s
                    if seconds > 0:
                        return now.minus(before.histograms[name]), seconds
        return None, 0.0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _age(unix_ms: int, now_s: float) -> str:
    return f"{max(now_s - unix_ms / 1000, 0.0):.1f}s"


def _workers_table(history: FleetHistory) -> Table:
    snapshot = history.latest
    table = Table(title=f"workers ({len(snapshot.workers)})", title_justify="left", expand=True)
    for column in ("worker", "model", "state", "running", "waiting", "KV usage", "tok/s", "finished", "beat"):
        table.add_column(column, justify="left" if column in ("worker", "model", "state") else "right")
    for worker in snapshot.workers:
        usage = worker.num_used_blocks / worker.num_blocks if worker.num_blocks else 0.0
        rate = history.tokens_per_s(worker)
        table.add_row(
            worker.worker_id,
            worker.model,
            Text("serving", "green") if worker.accepting else Text("draining", "yellow"),
            str(worker.num_running),
            str(worker.num_waiting),
            f"{usage:.1%} of {worker.num_blocks}",
            "-" if rate is None else f"{rate:.1f}",
            str(worker.num_finished),
            _age(worker.updated_unix_ms, snapshot.taken_s),
        )
    return table


def _streams_table(snapshot: Snapshot) -> Table:
    table = Table(title="request streams", title_justify="left", expand=True)
    for column in ("model", "queued (lag)", "running (pending)", "consumers"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for stream in snapshot.streams:
        table.add_row(stream.model, str(stream.unclaimed), str(stream.pending), str(stream.consumers))
    return table


def _gateways_table(history: FleetHistory) -> Table:
    snapshot = history.latest
    table = Table(title=f"gateways ({len(snapshot.gateways)})", title_justify="left", expand=True)
    for column in (
        "gateway",
        "model",
        "in flight",
        "req/s",
        "TTFT p50",
        "TTFT p99",
        "e2e p50",
        "e2e p99",
        "ITL p50",
    ):
        table.add_column(column, justify="left" if column in ("gateway", "model") else "right")
    for gateway in snapshot.gateways:
        e2e, seconds = history.recent(gateway, "e2e_request_latency_seconds")
        ttft, _ = history.recent(gateway, "time_to_first_token_seconds")
        itl, _ = history.recent(gateway, "inter_token_latency_seconds")
        rate = "-" if e2e is None else f"{e2e.count / seconds:.2f}"
        if gateway.scrape_error:
            latencies = [Text(gateway.scrape_error, "red"), "", "", "", ""]
        else:
            latencies = [
                _seconds(ttft and ttft.quantile(0.5)),
                _seconds(ttft and ttft.quantile(0.99)),
                _seconds(e2e and e2e.quantile(0.5)),
                _seconds(e2e and e2e.quantile(0.99)),
                _seconds(itl and itl.quantile(0.5)),
            ]
        table.add_row(
            gateway.status.gateway_id, gateway.status.model, str(gateway.status.in_flight), rate, *latencies
        )
    return table


def render(history: FleetHistory, title: str) -> RenderableType:
    snapshot = history.latest
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_s))
    header = Text.assemble((f"conveyor monitor  {title}", "bold"), f"  {clock}  window {history.window_s:g}s")
    if snapshot.error:
        return Group(header, Text(f"Redis unreachable: {snapshot.error}; retrying", "red"))
    return Group(header, _workers_table(history), _streams_table(snapshot), _gateways_table(history))


def run_monitor(options: MonitorOptions, console: Console | None = None) -> int:
    """Refresh until Ctrl-C (or once). Redis outages and vanished processes are shown, not fatal."""
    console = console or Console()
    client = connect(RedisSettings(redis_url=options.redis_url, redis_timeout_s=2.0))
    reader = FleetReader(client, StreamKeys(options.namespace))
    history = FleetHistory(options.window_s)
    title = f"namespace {options.namespace}"
    try:
        history.add(reader.read())
        if options.once:
            time.sleep(options.interval_s)
            history.add(reader.read())
            console.print(render(history, title))
            return 1 if history.latest.error else 0
        with Live(render(history, title), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(options.interval_s)
                history.add(reader.read())
                live.update(render(history, title))
    except KeyboardInterrupt:
        return 0
    finally:
        reader.close()
        client.close()
