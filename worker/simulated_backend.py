"""SimulatedBackend: a generation backend without a model, for capacity planning.

A step takes `1 / steps_per_s` (it sleeps what a GPU's forward would take) and gives every running
job one token, so the real serving loop, job stream, Redis and gateways carry the traffic of a GPU
fleet on a machine without one: one read and one publish a step, as with a model. The tokens cycle
through ordinary vocabulary ids, so gateways detokenize real text; no weights are loaded.
"""

import time

from checkpoints import ModelKind
from protos import inference_pb2, jobs_pb2
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
        self._running: dict[str, list[int]] = {}  # request id -> [tokens so far, max tokens, prompt]
        self._next_step = time.monotonic()
        self._generated = 0

    def block_ms(self, idle_block_ms: int) -> int | None:
        return None if self._running else idle_block_ms

    def start(self, job: jobs_pb2.Job, delivered_token_ids: tuple[int, ...]) -> None:
        if not self._running:
            self._next_step = time.monotonic() + self.step_s
        self._running[job.request_id] = [
            len(delivered_token_ids),
            job.sampling.max_tokens,
            len(job.prompt_token_ids),
        ]

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def step(self) -> list[jobs_pb2.TokenChunk]:
        if not self._running:
            return []
        time.sleep(max(self._next_step - time.monotonic(), 0.0))  # the forward pass
        self._next_step = max(self._next_step + self.step_s, time.monotonic())
        chunks = []
        for request_id, state in list(self._running.items()):
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
                )
            )
            if done:
                del self._running[request_id]
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
