"""EmbeddingCall: one accepted EmbedRequest — its job's one chunk, holding every vector."""

import time
from contextlib import aclosing
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.job_call import JobCall
from protos import inference_pb2, jobs_pb2


@dataclass(slots=True)
class EmbeddingCall:
    call: JobCall

    async def run(self) -> inference_pb2.EmbedResponse:
        response = inference_pb2.EmbedResponse()
        async with aclosing(self.call.chunks(self._describe)) as chunks:
            async for chunk in chunks:  # the only chunk is the last
                try:
                    response = self._response(chunk)
                except GatewayError as error:
                    self.call.fail(error)
                    raise
        return response

    def _response(self, chunk: jobs_pb2.TokenChunk) -> inference_pb2.EmbedResponse:
        call = self.call
        num_inputs = len(call.job.embed.inputs)
        if len(chunk.embeddings) != num_inputs:
            raise GatewayError(f"a worker returned {len(chunk.embeddings)} vectors for {num_inputs} inputs")
        now = time.time()
        started_s = chunk.started_unix_ms / 1000 if chunk.started_unix_ms else now
        response = inference_pb2.EmbedResponse(
            request_id=call.client_request_id,
            model=call.model.name,
            embeddings=chunk.embeddings,
            usage=inference_pb2.Usage(prompt_tokens=chunk.prompt_tokens),
            timings=inference_pb2.Timings(
                queued_s=max(started_s - call.accepted_s, 0.0), total_s=now - call.accepted_s
            ),
        )
        call.metrics.embedded(response)
        call.trace.interval("queue", call.accepted_s, started_s)
        call.trace.interval("embed", started_s, now)
        return response

    def _describe(self) -> str:
        inputs = self.call.job.embed.inputs
        return f"{len(inputs)} inputs, {sum(len(item.ids) for item in inputs)} tokens"
