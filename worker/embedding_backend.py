"""EmbeddingBackend: an embedding model's EmbeddingCore behind the serving loop. A job is one
embedding call; its vectors go back on one last chunk once all its inputs are encoded."""

import math

from checkpoints import ModelKind
from protos import jobs_pb2
from protos.redis_layout import ChoiceProgress
from worker.embedding_core import EmbeddingCore
from worker.job_check import JobLimits
from worker.job_codec import embedded_chunk
from worker.metrics import StepMetrics


class EmbeddingBackend:
    def __init__(self, core: EmbeddingCore, metrics: StepMetrics):
        self.core = core
        self.metrics = metrics
        model = core.model
        self.limits = JobLimits(ModelKind.EMBED, model.vocab_size, model.pooling.max_length)

    @property
    def max_jobs(self) -> int:
        return self.core.batcher.config.max_batch_size

    def block_ms(self, idle_block_ms: int) -> int | None:
        wait_s = self.core.wait_s()
        if wait_s is None:
            return idle_block_ms
        # Filling a batch: a new job wakes the read at once; otherwise the batch runs when due.
        return max(1, math.ceil(wait_s * 1000)) if wait_s > 0 else None

    def start(self, job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...]) -> None:
        normalize = job.embed.normalize if job.embed.HasField("normalize") else None
        self.core.add(job.request_id, [list(item.ids) for item in job.embed.inputs], normalize)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def finish_choice(self, request_id: str, choice_index: int) -> None:
        self.abort(request_id)  # an embedding call is one choice

    def step(self) -> list[jobs_pb2.TokenChunk]:
        step = self.core.step()
        if step is None:
            return []
        self.metrics.observe_step(step.num_padded_tokens, step.num_inputs)
        self.refresh_metrics()
        return [embedded_chunk(call.request_id, call.vectors, call.prompt_tokens) for call in step.finished]

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        status.num_running = self.core.batcher.num_calls
        status.num_waiting = self.core.batcher.num_queued_inputs
        status.architecture = self.core.model.architecture
        status.dtype = str(self.core.model.dtype).removeprefix("torch.")

    def refresh_metrics(self) -> None:
        self.metrics.running.set(self.core.batcher.num_calls)
        self.metrics.waiting.set(self.core.batcher.num_queued_inputs)

    def stats_line(self) -> str:
        stats = self.core.stats
        return (
            f"calls={self.core.batcher.num_calls} queued_inputs={self.core.batcher.num_queued_inputs} "
            f"batches={stats.num_batches} inputs={stats.num_inputs} padded_tokens={stats.num_padded_tokens}"
        )
