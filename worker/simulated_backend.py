"""SimulatedBackend: a generation backend without a model, for capacity planning.

A step takes `1 / steps_per_s` (it sleeps what a GPU's forward would take) and gives every running
choice of every job one token (choice c of n stops c tokens before max_tokens), so the real serving
loop, job stream, Redis and gateways carry the traffic of a GPU fleet on a machine without one: one
read and one publish a step, as with a model. The tokens cycle through ordinary vocabulary ids, so
gateways detokenize real text; no weights are loaded.
"""

import time

from checkpoints import ModelKind
from protos import inference_pb2, jobs_pb2
from protos.redis_layout import ChoiceProgress
from worker.job_check import JobLimits
from worker.metrics import StepMetrics

_FIRST_ID, _NUM_IDS = 1000, 1000  # ids of ordinary words in a BPE vocabulary of 30k or more


class SimulatedBackend:
    def __init__(
        self, vocab_size: int, max_context: int, max_jobs: int, steps_per_s: float, metrics: StepMetrics
    ):
        self.limits = JobLimits(ModelKind.GENERATE, vocab_size, max_context)
        self.max_jobs = max_jobs
        self.step_s = 1.0 / steps_per_s
        self.metrics = metrics
        # (request id, choice) -> [tokens so far, max tokens, prompt tokens]
        self._running: dict[tuple[str, int], list[int]] = {}
        self._next_step = time.monotonic()
        self._generated = 0

    def block_ms(self, idle_block_ms: int) -> int | None:
        return None if self._running else idle_block_ms

    def start(self, job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...]) -> None:
        if not self._running:
            self._next_step = time.monotonic() + self.step_s
        for choice in range(max(job.sampling.n, 1)):
            delivered = progress[choice] if progress else ChoiceProgress()
            if not delivered.finished:
                self._running[(job.request_id, choice)] = [
                    len(delivered.token_ids),
                    max(job.sampling.max_tokens - choice, 1),
                    len(job.prompt_token_ids),
                ]

    def abort(self, request_id: str) -> None:
        for key in [key for key in self._running if key[0] == request_id]:
            del self._running[key]

    def finish_choice(self, request_id: str, choice_index: int) -> None:
        self._running.pop((request_id, choice_index), None)

    def step(self) -> list[jobs_pb2.TokenChunk]:
        if not self._running:
            return []
        time.sleep(max(self._next_step - time.monotonic(), 0.0))  # the forward pass
        self._next_step = max(self._next_step + self.step_s, time.monotonic())
        chunks = []
        for key, state in list(self._running.items()):
            request_id, choice = key
            index, max_tokens, prompt_tokens = state
            state[0] += 1
            done = state[0] >= max_tokens
            chunks.append(
                jobs_pb2.TokenChunk(
                    request_id=request_id,
                    index=index,
                    token_ids=[(_FIRST_ID + index % _NUM_IDS) % self.limits.vocab_size],
                    finish_reason=inference_pb2.FINISH_REASON_LENGTH if done else 0,
                    prompt_tokens=prompt_tokens,
                    choice_index=choice,
                )
            )
            if done:
                del self._running[key]
        self._generated += len(chunks)
        self.metrics.observe_step(len(chunks), len(chunks))
        return chunks

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        status.num_running = len(self._running)
        status.generation_tokens = self._generated

    def refresh_metrics(self) -> None:
        self.metrics.running.set(len(self._running))

    def stats_line(self) -> str:
        return f"simulated running={len(self._running)} generated={self._generated}"
