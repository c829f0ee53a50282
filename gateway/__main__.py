"""`python -m gateway`: serve the public gRPC API until SIGTERM."""

import asyncio
import logging
import sys

from gateway.server import serve
from gateway.settings import GatewaySettings
from protos.log_format import configure_logging


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, "gateway", settings.log_format)
    logging.getLogger(__name__).info("settings: %s", settings.model_dump(exclude={"redis_url", "api_keys"}))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
