"""ClientStream: one GenerateStream call — many generations and cancels multiplexed on one stream."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator

from opentelemetry.context import Context

from gateway.admission import Admission
from gateway.call_context import Caller
from gateway.errors import ErrorKind, GatewayError, InvalidRequest, Overloaded
from protos import inference_pb2
from protos.redis_layout import MAX_CHOICES

logger = logging.getLogger(__name__)

_WAKE = None  # put on the outbox when a generation or the reader ends, to re-check for the end


class ClientStream:
    """Runs each generation of the stream as its own task; a failure of one is an in-band Error frame."""

    def __init__(
        self,
        admission: Admission,
        max_open: int,
        timeout_s: float | None,
        caller: Caller,
        trace_parent: Context,
    ):
        self.admission = admission
        self.max_open = max_open
        self.timeout_s = timeout_s
        self.caller = caller
        self.trace_parent = trace_parent
        self._outbox: asyncio.Queue[inference_pb2.ServerFrame | None] = asyncio.Queue()
        self._open: dict[str, asyncio.Task[None]] = {}
        self._reading = True

    async def read_all(self, frames: AsyncIterable[inference_pb2.ClientFrame]) -> None:
        """Consume client frames until the client half-closes."""
        try:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "generate":
                    self._start(frame.generate)
                elif kind == "cancel":
                    self._cancel(frame.cancel.request_id)
                else:
                    self._error("", InvalidRequest("frame: set generate or cancel"))
        finally:
            self._reading = False
            self._outbox.put_nowait(_WAKE)

    async def outbox(self) -> AsyncIterator[inference_pb2.ServerFrame]:
        """Frames to send; ends once the client half-closed and every generation ended."""
        while True:
            frame = await self._outbox.get()
            if frame is not None:
                yield frame
            elif not self._reading and not self._open and self._outbox.empty():
                return

    async def close(self) -> None:
        """The call ended early: stop every open generation (each publishes its Cancel)."""
        tasks = list(self._open.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, request: inference_pb2.GenerateRequest) -> None:
        client_id = request.request_id
        if client_id and client_id in self._open:
            self._error(
                client_id,
                GatewayError(
                    f"request_id: {client_id!r} is already open on this stream", ErrorKind.DUPLICATE
                ),
            )
            return
        if len(self._open) >= self.max_open:
            self._error(client_id, Overloaded(f"{self.max_open} requests are already open on this stream", 0))
            return
        key = client_id or f"anonymous-{uuid.uuid4().hex}"
        self._open[key] = asyncio.create_task(self._run(key, request))

    def _cancel(self, client_id: str) -> None:
        task = self._open.get(client_id)
        if task is None:
            self._error(
                client_id, GatewayError(f"request_id: no open request {client_id!r}", ErrorKind.NOT_FOUND)
            )
            return
        task.cancel()

    async def _run(self, key: str, request: inference_pb2.GenerateRequest) -> None:
        client_id = request.request_id
        # Until admitted, the choices it asked for (within the bound): each gets its cancel frame.
        open_choices = list(range(min(max(request.sampling.n, 1), MAX_CHOICES)))
        try:
            generation = await self.admission.generation(
                request, self.timeout_s, self.caller, self.trace_parent
            )
            client_id = generation.call.client_request_id
            open_choices = generation.open_choices()
            async for response in generation.run():
                self._outbox.put_nowait(inference_pb2.ServerFrame(request_id=client_id, response=response))
                open_choices = generation.open_choices()
        except asyncio.CancelledError:
            for choice_index in open_choices:  # each open choice ends, as it would have
                self._outbox.put_nowait(
                    inference_pb2.ServerFrame(
                        request_id=client_id,
                        response=inference_pb2.GenerateResponse(
                            request_id=client_id,
                            finish_reason=inference_pb2.FINISH_REASON_CANCELLED,
                            choice_index=choice_index,
                        ),
                    )
                )
        except GatewayError as error:
            self._error(client_id, error)
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the stream
            logger.exception("request failed request_id=%s", client_id)
            self._error(client_id, GatewayError(f"internal error: {error}"))
        finally:
            del self._open[key]
            self._outbox.put_nowait(_WAKE)

    def _error(self, client_id: str, error: GatewayError) -> None:
        self._outbox.put_nowait(inference_pb2.ServerFrame(request_id=client_id, error=error.to_proto()))
