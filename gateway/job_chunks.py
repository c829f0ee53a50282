"""job_chunks: one job submitted and its chunks read back — what a generation and an embedding
call share."""

import asyncio
from collections.abc import AsyncIterator

import grpc

from gateway.errors import GatewayError
from gateway.job_queue import JobQueue
from gateway.job_watch import JobWatch, WatchPolicy
from gateway.response_router import ResponseRouter
from protos import inference_pb2, jobs_pb2


async def job_chunks(
    job: jobs_pb2.Job, jobs: JobQueue, router: ResponseRouter, policy: WatchPolicy
) -> AsyncIterator[jobs_pb2.TokenChunk]:
    """Queue the job and yield its chunks up to its last; an error chunk raises its status, a job
    that is lost raises UNAVAILABLE. Closed before the last chunk (the client left, cancelled, or
    its deadline passed), it publishes a Cancel. Use under `contextlib.aclosing`."""
    request_id = job.request_id
    queue = router.register(request_id)
    finished = False
    try:
        watch = JobWatch(jobs, await jobs.submit(job), policy)
        while not finished:
            try:
                chunk = await asyncio.wait_for(queue.get(), policy.interval_s)
            except TimeoutError:
                await watch.check()
                continue
            finished = chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
            if chunk.finish_reason == inference_pb2.FINISH_REASON_ERROR:
                raise GatewayError(chunk.error.message, _status(chunk.error.code))
            yield chunk
    finally:
        router.unregister(request_id)
        if not finished:
            await asyncio.shield(jobs.cancel(request_id))


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.INTERNAL
