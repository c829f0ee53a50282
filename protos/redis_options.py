"""How gateways and workers connect to Redis: bounded waits, and TLS for `rediss://` URLs.

A password or ACL user goes in the URL (`redis://user:password@host:6379/0`); the URL is never logged.
"""

from pathlib import Path


def redis_options(url: str, timeout_s: float, ca_file: Path | None) -> dict[str, object]:
    """Keyword arguments for `Redis.from_url` (sync or asyncio)."""
    options: dict[str, object] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
    elif ca_file is not None:
        raise ValueError("redis_ca_file is set but the Redis URL is not rediss://")
    return options
