"""EmbeddingRunner: an embedding model's EmbeddingCore behind the serving loop. A job is one
embedding call; its vectors go back on one last chunk once all its inputs are encoded."""

import math

from protos import inference_pb2, jobs_pb2
from worker.embedding_core import EmbeddingCore
from worker.metrics import StepMetrics


class EmbeddingRunner:
    def __init__(self, core: EmbeddingCore, metrics: StepMetrics):
        self.core = core
        self.metrics = metrics
        self.vocab_size = core.model.vocab_size

    @property
    def max_jobs(self) -> int:
        return self.core.batcher.config.max_batch_size

    @property
    def max_context(self) -> int:
        return self.core.model.pooling.max_length

    def block_ms(self, idle_block_ms: int) -> int | None:
        wait_s = self.core.wait_s()
        if wait_s is None:
            return idle_block_ms
        # Filling a batch: a new job wakes the read at once; otherwise the batch runs when due.
        return max(1, math.ceil(wait_s * 1000)) if wait_s > 0 else None

    def problem(self, job: jobs_pb2.Job) -> str | None:
        if not job.HasField("embed"):
            return "a generation job sent to an embedding model"
        inputs = job.embed.inputs
        if not inputs:
            return "no inputs"
        for index, item in enumerate(inputs):
            if not item.ids:
                return f"input {index} is empty"
            if max(item.ids) >= self.vocab_size:
                return f"input {index}: token id {max(item.ids)} outside the vocabulary ({self.vocab_size})"
        return None

    def start(self, job: jobs_pb2.Job, delivered_token_ids: tuple[int, ...]) -> None:
        normalize = job.embed.normalize if job.embed.HasField("normalize") else None
        self.core.add(job.request_id, [list(item.ids) for item in job.embed.inputs], normalize)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def step(self) -> list[jobs_pb2.TokenChunk]:
        batches_before = self.core.stats.num_batches
        finished = self.core.step()
        stats = self.core.stats
        if stats.num_batches != batches_before:
            self.metrics.observe_step(stats.last_batch_tokens, stats.last_batch_size)
            self.refresh_metrics()
        return [
            jobs_pb2.TokenChunk(
                request_id=call.request_id,
                finish_reason=inference_pb2.FINISH_REASON_STOP,
                prompt_tokens=call.prompt_tokens,
                embeddings=[inference_pb2.Embedding(values=vector) for vector in call.vectors],
            )
            for call in finished
        ]

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        status.num_running = self.core.batcher.num_calls
        status.num_waiting = self.core.batcher.num_queued_inputs

    def refresh_metrics(self) -> None:
        self.metrics.running.set(self.core.batcher.num_calls)
        self.metrics.waiting.set(self.core.batcher.num_queued_inputs)

    def stats_line(self) -> str:
        stats = self.core.stats
        return (
            f"calls={self.core.batcher.num_calls} queued_inputs={self.core.batcher.num_queued_inputs} "
            f"batches={stats.num_batches} inputs={stats.num_inputs} padded_tokens={stats.num_padded_tokens}"
        )
