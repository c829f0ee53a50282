"""HttpServer: uvicorn serving the OpenAI front on the gateway's own event loop, beside grpc.aio,
with the gateway's TLS settings; the gateway, not uvicorn, handles SIGTERM and SIGINT."""

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from gateway.settings import GatewaySettings

_CLOSE_WAIT_S = 5.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the gateway's own handlers stay: it stops this server when it stops


class HttpServer:
    """Binds its port at construction, before the gateway starts anything: a port in use stops the
    gateway at once, with the reason, instead of after it reported healthy on gRPC."""

    def __init__(self, app: Starlette, settings: GatewaySettings):
        tls = settings.tls_cert_file is not None
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            lifespan="off",
            log_config=None,  # the gateway's logging as configured, not uvicorn's
            access_log=False,
            proxy_headers=False,  # the caller is the peer, as on gRPC: limits are not spoofed by a header
            ws="none",
            timeout_graceful_shutdown=1,
            ssl_certfile=settings.tls_cert_file if tls else None,
            ssl_keyfile=settings.tls_key_file if tls else None,
            ssl_ca_certs=settings.tls_client_ca_file if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and settings.tls_client_ca_file else ssl.CERT_NONE,
        )
        self._socket: socket.socket = config.bind_socket()
        self.port = int(self._socket.getsockname()[1])
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the port and the connections still open (their calls had the grace period), and
        wait for the calls cut short to end, so that each publishes its job's cancel."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        tasks = list(self._server.server_state.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
