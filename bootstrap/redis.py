"""How gateways and workers connect to Redis: bounded waits, TLS for `rediss://` URLs, and a Redis
Cluster for `redis+cluster://` (or `rediss+cluster://`) URLs naming any of its nodes.

A password or ACL user goes in the URL (`redis://user:password@host:6379/0`); the URL is never logged.
In a cluster every key of one model lives in one slot (see `protos/redis_layout.py`), so each
script and each multi-key command stays on one node.
"""

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from bootstrap.settings import RedisSettings


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0].endswith("+cluster")


def _plain(url: str) -> str:
    """The URL redis-py takes: the scheme without `+cluster`."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.removesuffix('+cluster')}://{rest}"


def redis_options(settings: RedisSettings) -> dict[str, object]:
    """Keyword arguments for `Redis.from_url` or `RedisCluster.from_url` (sync or asyncio)."""
    timeout_s = settings.redis_timeout_s
    options: dict[str, object] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    if settings.redis_url.startswith("rediss"):
        options["ssl_cert_reqs"] = "required"
        if settings.redis_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.redis_ca_file)
    elif settings.redis_ca_file is not None:
        raise ValueError("redis_ca_file is set but the Redis URL is not rediss://")
    return options


def connect(settings: RedisSettings) -> redis.Redis | RedisCluster:
    """A worker's client: no retries of its own against one Redis, the serving loop recovers from
    errors itself. A cluster client follows what the cluster redirects and retries a call on a
    node that moved or failed over, as redis-py's cluster client does; what it cannot, the loop
    recovers from."""
    url = settings.redis_url
    if is_cluster(url):
        return RedisCluster.from_url(_plain(url), **redis_options(settings))
    return redis.Redis.from_url(url, **redis_options(settings))


def connect_async(settings: RedisSettings) -> aioredis.Redis | AsyncRedisCluster:
    """A gateway's client. A pooled connection that died (Redis restarted) fails its next command:
    that is retried once on a fresh one. (A retried XADD whose reply was lost may queue a job
    twice; workers drop the second copy.) A cluster client also follows slots that moved."""
    url = settings.redis_url
    retry = {
        "retry_on_error": [RedisConnectionError],
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
    }
    if is_cluster(url):
        return AsyncRedisCluster.from_url(_plain(url), **retry, **redis_options(settings))  # type: ignore[arg-type]
    return aioredis.Redis.from_url(url, **retry, **redis_options(settings))  # type: ignore[arg-type]
