"""`python -m gateway`: serve the public gRPC API until SIGTERM."""

import asyncio
import sys

from bootstrap.process import Process
from gateway.server import serve
from gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    process = Process.start("gateway", settings, settings.gateway_id, {"redis_url", "api_keys"})
    asyncio.run(serve(settings, process))


if __name__ == "__main__":
    main()
