"""GenerationRunner: a generation model's EngineCore behind the serving loop."""

from protos import jobs_pb2
from worker.engine_core import EngineCore
from worker.job_codec import chunk_to_proto, job_problem, sequence_from_job
from worker.metrics import GenerationMetrics


class GenerationRunner:
    def __init__(self, core: EngineCore, metrics: GenerationMetrics):
        self.core = core
        self.metrics = metrics

    @property
    def max_jobs(self) -> int:
        return self.core.scheduler.config.max_num_seqs

    @property
    def max_context(self) -> int:
        return self.core.max_model_len

    def block_ms(self, idle_block_ms: int) -> int | None:
        return idle_block_ms if self.core.scheduler.is_idle else None

    def problem(self, job: jobs_pb2.Job) -> str | None:
        if job.HasField("embed"):
            return "an embedding job sent to a generation model"
        return job_problem(job, self.core.vocab_size)

    def start(self, job: jobs_pb2.Job, delivered_token_ids: tuple[int, ...]) -> None:
        self.core.add(sequence_from_job(job, delivered_token_ids))

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def step(self) -> list[jobs_pb2.TokenChunk]:
        stats = self.core.stats
        steps_before = stats.num_steps
        chunks = [chunk_to_proto(chunk) for chunk in self.core.step()]
        if stats.num_steps != steps_before:
            self.metrics.observe_step(stats.last_step_tokens, stats.last_step_seqs)
        return chunks

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        scheduler = self.core.scheduler
        status.num_running = len(scheduler.running)
        status.num_waiting = len(scheduler.waiting)
        status.num_used_blocks = scheduler.block_manager.num_used_blocks
        status.num_blocks = scheduler.block_manager.num_blocks
        status.generation_tokens = self.core.stats.num_generated

    def refresh_metrics(self) -> None:
        self.metrics.refresh()

    def stats_line(self) -> str:
        scheduler = self.core.scheduler
        stats = self.core.stats
        return (
            f"running={len(scheduler.running)} waiting={len(scheduler.waiting)} "
            f"free_blocks={scheduler.block_manager.num_free_blocks} steps={stats.num_steps} "
            f"tokens={stats.num_tokens} preemptions={scheduler.num_preemptions}"
        )
