"""The monitor without a fleet: an unreachable Redis is shown, not raised."""

import io

import redis
from rich.console import Console

from client.fleet_snapshot import FleetReader
from client.monitor import FleetHistory, render
from client.redis_server import free_port
from protos.redis_layout import StreamKeys


def test_unreachable_redis_is_reported_in_the_frame() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=1)
    reader = FleetReader(client, StreamKeys("nowhere"))
    history = FleetHistory(60)
    history.add(reader.read())
    reader.close()
    assert history.latest.error
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(history, "test"))
    assert "Redis unreachable" in console.export_text()
