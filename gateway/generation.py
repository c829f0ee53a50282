"""Generation: one accepted GenerateRequest — its job's chunks, detokenized, as response frames
(one stream of them per choice when it asks for n). The gateway owns stop strings: it detokenizes,
so it is where a stop string is matched, the text cut before it and the choice stopped."""

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
class _Choice:
    """Where one of the request's n completions stands in the client's stream."""

    text_stream: TextStream  # with the request's stop strings
    next_index: int = 0
    finished: bool = False
    last_token_s: float = 0.0  # when its latest tokens came, for the inter-token latency


@dataclass(slots=True)
class Generation:
    """Streams one job's chunks back as GenerateResponse frames, each token of each choice exactly
    once. Leaving before the last chunk (client cancel, disconnect, deadline, a stop string in every
    choice) cancels the job; a stop string in one of n choices ends only that one."""

    call: JobCall
    choices: list[_Choice]
    prompt_logprobs_sent: bool = False

    @classmethod
    def of(cls, call: JobCall, stop: tuple[str, ...]) -> "Generation":
        """The call's generation, with a text stream for each choice its job asks for."""
        num_choices = max(call.job.sampling.n, 1)
        return cls(call, [_Choice(TextStream(call.model.tokenizer, stop)) for _ in range(num_choices)])

    async def run(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call, metrics = self.call, self.call.metrics
        started_s = first_token_s = 0.0
        async with aclosing(call.chunks(self._describe)) as chunks:
            async for chunk in chunks:
                if chunk.started_unix_ms:
                    started_s = chunk.started_unix_ms / 1000
                if chunk.choice_index >= len(self.choices) or self.choices[chunk.choice_index].finished:
                    continue  # a choice its stop string ended, run again after a worker handover
                choice = self.choices[chunk.choice_index]
                if chunk.index > choice.next_index:  # never a gap: Redis lost an entry (a failover)
                    raise Unavailable(
                        f"tokens {choice.next_index} to {chunk.index - 1} were lost on the way "
                        "(a Redis failover?): retry"
                    )
                skip = max(choice.next_index - chunk.index, 0)  # a chunk resent after a worker handover
                finished = chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                if len(chunk.token_ids) <= skip and not finished:
                    continue
                now, num_new = time.time(), len(chunk.token_ids) - skip
                if not first_token_s:  # observed now, as vLLM does: a long generation shows at once
                    first_token_s = now
                    metrics.ttft.observe(now - call.accepted_s)
                if num_new > 0:
                    if choice.last_token_s:  # tokens that came together share the gap since the last ones
                        for _ in range(num_new):
                            metrics.inter_token.observe((now - choice.last_token_s) / num_new)
                    choice.last_token_s = now
                piece = await asyncio.get_running_loop().run_in_executor(
                    call.context.executor, self._piece, choice, chunk, skip
                )
                response = inference_pb2.GenerateResponse(
                    request_id=call.client_request_id,
                    text=piece.text,
                    token_ids=piece.token_ids,
                    index=max(chunk.index, choice.next_index),
                    finish_reason=piece.finish_reason,
                    logprobs=piece.logprobs,
                    choice_index=chunk.choice_index,
                )
                if chunk.prompt_logprobs and not self.prompt_logprobs_sent:
                    response.prompt_logprobs.extend(chunk.prompt_logprobs)
                    self.prompt_logprobs_sent = True
                choice.next_index = max(chunk.index, choice.next_index) + len(piece.token_ids)
                if piece.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    choice.finished = True
                    if all(c.finished for c in self.choices):
                        prompt_tokens = chunk.prompt_tokens or len(call.job.prompt_token_ids)
                        self._finish(response, prompt_tokens, started_s, first_token_s)
                        yield response
                        return
                    yield response
                    if not finished:  # its stop string matched here: its worker may stop it
                        await call.stop_choice(chunk.choice_index)
                    continue
                yield response

    @staticmethod
    def _piece(choice: _Choice, chunk: jobs_pb2.TokenChunk, skip: int) -> _Piece:
        """The chunk's new tokens and their text, pushed token by token so that, when a stop string
        matches, the tokens end with the one that completed it."""
        token_ids, logprobs = list(chunk.token_ids)[skip:], list(chunk.logprobs)[skip:]
        stream, text = choice.text_stream, ""
        for count, token_id in enumerate(token_ids, 1):
            text += stream.push([token_id])
            if stream.matched_stop is not None:
                return _Piece(token_ids[:count], logprobs[:count], text, inference_pb2.FINISH_REASON_STOP)
        if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            text += stream.flush()
        return _Piece(token_ids, logprobs, text, chunk.finish_reason)

    @property
    def num_streamed(self) -> int:
        """Tokens sent to the client, over every choice."""
        return sum(choice.next_index for choice in self.choices)

    def open_choices(self) -> list[int]:
        """The choices that have not had their last frame."""
        return [index for index, choice in enumerate(self.choices) if not choice.finished]

    def _describe(self) -> str:
        choices = f" in {len(self.choices)} choices" if len(self.choices) > 1 else ""
        prompt = len(self.call.job.prompt_token_ids)
        return f"{prompt} prompt tokens, {self.num_streamed} tokens streamed{choices}"

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
        response.usage.completion_tokens = self.num_streamed
        response.timings.queued_s = max(started_s - call.accepted_s, 0.0) if started_s else 0.0
        response.timings.time_to_first_token_s = first_token_s - call.accepted_s
        response.timings.total_s = now - call.accepted_s
        call.metrics.finished(response)
        call.trace.interval("queue", call.accepted_s, started_s or first_token_s)
        call.trace.interval("stream", first_token_s, now)
