"""LLM: the engine in-process, like vLLM's offline `LLM` — prompts in, completions out."""

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from checkpoints import model_dir_of
from scheduler import FinishReason, SampledToken, SamplingParams, Sequence
from tokenization import TextStream, Tokenizer
from worker.generation_core import GenerationCore
from worker.settings import EngineSettings


@dataclass(slots=True)
class Completion:
    """One finished generation, with per-token arrival times for latency figures."""

    request_id: str
    prompt_token_ids: list[int]
    choice_index: int = 0  # which of the prompt's `n` completions
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    submitted_s: float = 0.0  # time.perf_counter() when submitted
    token_times_s: list[float] = field(default_factory=list)  # perf_counter() when each token arrived
    prompt_logprobs: list[SampledToken] = field(default_factory=list)  # prompt tokens 1.., when asked


class LLM:
    """Runs the same GenerationCore step as a serving worker, without Redis or gRPC. Like the
    gateway, it detokenizes, so it matches stop strings and ends a sequence at one."""

    def __init__(self, settings: EngineSettings | None = None, **overrides: Any):
        self.settings = settings or EngineSettings(**overrides)
        self.core = GenerationCore.from_settings(self.settings)
        self.tokenizer = Tokenizer(model_dir_of(self.settings.model))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Submit every prompt at once and step until all finish: `n` completions of each, in the
        prompts' order. Raw text prompts get no chat template."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        completions: dict[tuple[str, int], Completion] = {}
        streams: dict[tuple[str, int], TextStream] = {}
        for prompt, sampling_params in zip(prompts, params, strict=True):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"llm-{next(self._ids)}"
            choices = tuple(range(1, sampling_params.n))
            self.core.add(Sequence(request_id, token_ids, sampling_params, fork_choices=choices))
            for choice in range(sampling_params.n):
                key = (request_id, choice)
                completions[key] = Completion(request_id, token_ids, choice, submitted_s=time.perf_counter())
                streams[key] = TextStream(self.tokenizer, sampling_params.stop)
        while not self.core.scheduler.is_idle:
            step = self.core.step()
            for chunk in step.chunks if step is not None else []:
                now = time.perf_counter()
                key = (chunk.request_id, chunk.choice_index)
                completion = completions[key]
                stream = streams[key]
                completion.prompt_logprobs.extend(chunk.prompt_logprobs)
                for token_id in chunk.token_ids:  # a chunk of drafts may go past a stop string
                    completion.token_ids.append(token_id)
                    completion.token_times_s.append(now)
                    completion.text += stream.push([token_id])
                    if stream.matched_stop is not None:
                        break
                finish_reason = chunk.finish_reason
                if stream.matched_stop is not None and finish_reason is None:
                    finish_reason = FinishReason.STOP
                    self.core.finish(chunk.request_id, finish_reason, chunk.choice_index)
                if finish_reason is not None:
                    completion.finish_reason = finish_reason
                    completion.text += stream.flush()
        return list(completions.values())
