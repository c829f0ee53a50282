"""GenerationBackend: a generation model's GenerationCore behind the serving loop."""

from checkpoints import ModelKind
from protos import jobs_pb2
from protos.redis_layout import ChoiceProgress
from scheduler import FinishReason
from worker.generation_core import GenerationCore
from worker.job_check import JobLimits
from worker.job_codec import chunk_to_proto, sequences_from_job
from worker.metrics import GenerationMetrics


class GenerationBackend:
    def __init__(self, core: GenerationCore, metrics: GenerationMetrics):
        self.core = core
        self.metrics = metrics
        matchers = core.runner.matchers
        self.limits = JobLimits(
            ModelKind.GENERATE,
            core.vocab_size,
            core.max_model_len,
            None if matchers is None else matchers.error_of,
            core.scheduler.config.max_num_seqs,
        )

    @property
    def max_jobs(self) -> int:
        return self.core.scheduler.config.max_num_seqs

    def block_ms(self, idle_block_ms: int) -> int | None:
        return idle_block_ms if self.core.scheduler.is_idle else None

    def start(self, job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...]) -> None:
        for seq in sequences_from_job(job, progress):
            self.core.add(seq)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def finish_choice(self, request_id: str, choice_index: int) -> None:
        self.core.finish(request_id, FinishReason.STOP, choice_index)

    def step(self) -> list[jobs_pb2.TokenChunk]:
        step = self.core.step()
        if step is None:
            return []
        self.metrics.observe_step(step.num_tokens, step.num_seqs)
        return [chunk_to_proto(chunk) for chunk in step.chunks]

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        scheduler = self.core.scheduler
        status.num_running = len(scheduler.running)
        status.num_waiting = len(scheduler.waiting)
        status.num_used_blocks = scheduler.block_manager.num_used_blocks
        status.num_blocks = scheduler.block_manager.num_blocks
        status.generation_tokens = self.core.stats.num_generated
        status.architecture = self.core.runner.model.config.model_type
        status.dtype = str(self.core.runner.kv_cache.dtype).removeprefix("torch.")
        status.quantization = self.core.quantization

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
