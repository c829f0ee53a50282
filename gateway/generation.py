"""Generation: one accepted GenerateRequest — its job's chunks, detokenized, as response frames.
The gateway owns stop strings: it detokenizes, so it is where a stop string is matched, the text
cut before it and the job cancelled."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from gateway.errors import Unavailable
from gateway.job_call import JobCall
from protos import inference_pb2, jobs_pb2
from tokenization import TextStream


@dataclass(slots=True)
class _Piece:
    """What a chunk adds to the client's stream."""

    token_ids: list[int]
    logprobs: list[inference_pb2.TokenLogprobs]
    text: str
    finish_reason: int


@dataclass(slots=True)
class Generation:
    """Streams one job's chunks back as GenerateResponse frames, each token exactly once. Leaving
    before the last chunk (client cancel, disconnect, deadline, a stop string) cancels the job."""

    call: JobCall
    text_stream: TextStream  # with the request's stop strings
    next_index: int = 0

    async def run(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call, metrics = self.call, self.call.model.metrics
        started_s = first_token_s = last_token_s = 0.0
        async with aclosing(call.chunks(self._describe)) as chunks:
            async for chunk in chunks:
                if chunk.started_unix_ms:
                    started_s = chunk.started_unix_ms / 1000
                if chunk.index > self.next_index:  # never a gap: Redis lost an entry (a failover)
                    raise Unavailable(
                        f"tokens {self.next_index} to {chunk.index - 1} were lost on the way "
                        "(a Redis failover?): retry"
                    )
                skip = max(self.next_index - chunk.index, 0)  # a chunk resent after a worker handover
                finished = chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                if len(chunk.token_ids) <= skip and not finished:
                    continue
                now, num_new = time.time(), len(chunk.token_ids) - skip
                if not first_token_s:  # observed now, as vLLM does: a long generation shows at once
                    first_token_s = now
                    metrics.ttft.observe(now - call.accepted_s)
                if num_new > 0:
                    if last_token_s:  # tokens that came together share the gap since the last ones
                        for _ in range(num_new):
                            metrics.inter_token.observe((now - last_token_s) / num_new)
                    last_token_s = now
                piece = await asyncio.get_running_loop().run_in_executor(
                    call.context.executor, self._piece, chunk, skip
                )
                response = inference_pb2.GenerateResponse(
                    request_id=call.client_request_id,
                    text=piece.text,
                    token_ids=piece.token_ids,
                    index=max(chunk.index, self.next_index),
                    finish_reason=piece.finish_reason,
                    logprobs=piece.logprobs,
                    prompt_logprobs=chunk.prompt_logprobs if self.next_index == 0 else [],
                )
                self.next_index = max(chunk.index, self.next_index) + len(piece.token_ids)
                if piece.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    prompt_tokens = chunk.prompt_tokens or len(call.job.prompt_token_ids)
                    self._finish(response, prompt_tokens, started_s, first_token_s)
                    yield response
                    return
                yield response

    def _piece(self, chunk: jobs_pb2.TokenChunk, skip: int) -> _Piece:
        """The chunk's new tokens and their text, pushed token by token so that, when a stop string
        matches, the tokens end with the one that completed it."""
        token_ids, logprobs = list(chunk.token_ids)[skip:], list(chunk.logprobs)[skip:]
        stream, text = self.text_stream, ""
        for count, token_id in enumerate(token_ids, 1):
            text += stream.push([token_id])
            if stream.matched_stop is not None:
                return _Piece(token_ids[:count], logprobs[:count], text, inference_pb2.FINISH_REASON_STOP)
        if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            text += stream.flush()
        return _Piece(token_ids, logprobs, text, chunk.finish_reason)

    def _describe(self) -> str:
        return f"{len(self.call.job.prompt_token_ids)} prompt tokens, {self.next_index} tokens streamed"

    def _finish(
        self,
        response: inference_pb2.GenerateResponse,
        prompt_tokens: int,
        started_s: float,
        first_token_s: float,
    ) -> None:
        call, now = self.call, time.time()
        call.finish()
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = self.next_index
        response.timings.queued_s = max(started_s - call.accepted_s, 0.0) if started_s else 0.0
        response.timings.time_to_first_token_s = first_token_s - call.accepted_s
        response.timings.total_s = now - call.accepted_s
        call.model.metrics.finished(response)
        call.trace.interval("queue", call.accepted_s, started_s or first_token_s)
        call.trace.interval("stream", first_token_s, now)
