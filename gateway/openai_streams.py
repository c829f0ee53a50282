"""How the OpenAI front waits on its calls: frames of one or several generations as they come, the
work of a call bounded by its client staying and its deadline, and an event stream that closes its
generator (and so its jobs) however the response ends."""

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import ErrorKind, GatewayError
from gateway.generation import Generation
from gateway.openai_errors import error_object
from protos import inference_pb2

T = TypeVar("T")


async def frames_of(
    generations: list[Generation],
) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
    """Every generation's frames as they come, each with the index of its first choice (a completion
    call of several prompts numbers its choices prompt by prompt, n each)."""
    if len(generations) == 1:
        async with aclosing(generations[0].run()) as frames:
            async for frame in frames:
                yield 0, frame
        return
    queue: asyncio.Queue[tuple[int, inference_pb2.GenerateResponse] | BaseException | None] = asyncio.Queue()
    num_choices = max(generations[0].call.job.sampling.n, 1)

    async def pump(offset: int, generation: Generation) -> None:
        try:
            async with aclosing(generation.run()) as frames:
                async for frame in frames:
                    queue.put_nowait((offset, frame))
        except Exception as error:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i * num_choices, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def deadline_of(timeout_s: float | None) -> float | None:
    """The loop time at which a call with this timeout ends."""
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s


async def while_connected(request: Request, work: Awaitable[T], deadline: float | None) -> T:
    """The work's result, unless the client leaves first (the work is cancelled, its job with it)
    or the deadline passes (504, as a gRPC deadline)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.create_task(disconnected())
    timeout = None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.0)
    try:
        await asyncio.wait({task, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left, the deadline passed, or this handler was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled() and watch.done() and not watch.cancelled():
        raise GatewayError("the client disconnected", ErrorKind.CANCELLED)
    if task.cancelled():
        raise GatewayError("deadline exceeded (x-request-timeout)", ErrorKind.DEADLINE)
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events whose generators are closed when the response ends, whether it ran out,
    the client left or the server stopped: closing them ends the calls they stream. `source` is the
    generator `events` reads from, closed too: a client that leaves before `events` starts would
    otherwise leave it (and its jobs) to the garbage collector."""

    def __init__(self, events: AsyncGenerator[str, None], source: AsyncGenerator[str, None]):
        super().__init__(events, media_type="text/event-stream")
        self._generators = (events, source)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generator in self._generators:
                await generator.aclose()


async def until_deadline(events: AsyncIterator[str], deadline: float | None) -> AsyncIterator[str]:
    """The events until the deadline; past it, an error event and the end."""
    async with aclosing(events):  # type: ignore[type-var]
        while True:
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            try:  # not asyncio.wait_for, which in Python 3.11 can drop the client's leaving
                async with asyncio.timeout(remaining):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                error = GatewayError("deadline exceeded (x-request-timeout)", ErrorKind.DEADLINE)
                yield event_line(error_object(error))
                yield "data: [DONE]\n\n"
                return
            yield event


def event_line(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
