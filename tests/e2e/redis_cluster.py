"""A real local Redis Cluster for tests: three masters and a replica each, from the redis-server
the project already runs, joined by redis-cli's own `--cluster create`."""

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from client.redis_server import RedisServer, redis_server_binary


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, at most 65,535) is free too."""
    while True:
        port = random.randint(20_000, 55_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def redis_cli_binary() -> str:
    beside = Path(redis_server_binary()).with_name("redis-cli")
    return str(beside) if beside.exists() else shutil.which("redis-cli") or "redis-cli"


class LocalRedisCluster:
    """Six nodes on loopback; `url` is a `redis+cluster://` seed for gateways and workers."""

    def __init__(self, node_timeout_ms: int = 1500):
        cluster_args = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms))
        self.nodes = [
            RedisServer(cluster_port(), extra_args=(*cluster_args, "--cluster-config-file", "nodes.conf"))
            for _ in range(6)
        ]
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def __enter__(self) -> "LocalRedisCluster":
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            command = [redis_cli_binary(), "--cluster", "create", *addresses, "--cluster-replicas", "1"]
            subprocess.run([*command, "--cluster-yes"], check=True, capture_output=True)
            self.wait_until_ok()
        except BaseException:
            self.__exit__()  # no node outlives a cluster that did not come up
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.close()

    def live_url(self) -> str:
        """A `redis+cluster://` seed on a node that is up (the first may have been killed)."""
        node = next(n for n in self.nodes if n.process is not None and n.process.poll() is None)
        return f"redis+cluster://127.0.0.1:{node.port}/0"

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.live_url().replace("+cluster", ""))

    def wait_until_ok(self, timeout_s: float = 30.0) -> None:
        """Every live node says the cluster is ok (all slots served)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                if node.process is None or node.process.poll() is not None:
                    continue
                with redis.Redis(port=node.port) as plain:
                    states.append(plain.cluster("info").get("cluster_state"))
            if states and all(state == "ok" for state in states):
                return
            time.sleep(0.2)
        raise AssertionError("the cluster did not come up")

    def master_of(self, key: str) -> RedisServer:
        """The node that serves the key's slot now."""
        with self.client() as cluster:
            node = cluster.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(node.port))
