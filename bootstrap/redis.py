"""How gateways and workers connect to Redis: bounded waits, and TLS for `rediss://` URLs.

A password or ACL user goes in the URL (`redis://user:password@host:6379/0`); the URL is never logged.
"""

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from bootstrap.settings import RedisSettings


def redis_options(settings: RedisSettings) -> dict[str, object]:
    """Keyword arguments for `Redis.from_url` (sync or asyncio)."""
    timeout_s = settings.redis_timeout_s
    options: dict[str, object] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    if settings.redis_url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        if settings.redis_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.redis_ca_file)
    elif settings.redis_ca_file is not None:
        raise ValueError("redis_ca_file is set but the Redis URL is not rediss://")
    return options


def connect(settings: RedisSettings) -> redis.Redis:
    """A worker's client: no retries of its own, the serving loop recovers from errors itself."""
    return redis.Redis.from_url(settings.redis_url, **redis_options(settings))


def connect_async(settings: RedisSettings) -> aioredis.Redis:
    """A gateway's client. A pooled connection that died (Redis restarted) fails its next command:
    that is retried once on a fresh one. (A retried XADD whose reply was lost may queue a job
    twice; workers drop the second copy.)"""
    return aioredis.Redis.from_url(
        settings.redis_url,
        retry_on_error=[RedisConnectionError],
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        **redis_options(settings),
    )
