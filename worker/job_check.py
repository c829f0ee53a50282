"""Whether a job can run on this worker at all: one check for both model kinds, so a job is refused
in one place. Gateways validate requests, but anything can write to the stream: a job that would
crash the model (an id outside the embedding, a NaN temperature) or can never fit is refused here,
buried, and its gateway told (JOB_FAILURE_INVALID)."""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import llguidance

from checkpoints import ModelKind
from protos import jobs_pb2
from protos.redis_layout import MAX_CHOICES


@dataclass(frozen=True, slots=True)
class JobLimits:
    """What this worker's model takes."""

    kind: ModelKind
    vocab_size: int
    max_context: int  # generation: prompt and completion; embeddings: one input
    # Why a grammar cannot be matched with this model's tokenizer ("" when it can); None: grammars
    # are only checked to compile.
    grammar_error: Callable[[str], str] | None = None
    max_choices: int = MAX_CHOICES  # a job's n: its choices run at once


def refusal(job: jobs_pb2.Job, num_delivered: int, limits: JobLimits) -> str | None:
    """Why the job can never run here, or None. `num_delivered`: tokens a resumed job already has."""
    if job.HasField("embed") != (limits.kind is ModelKind.EMBED):
        sent = "an embedding job" if job.HasField("embed") else "a generation job"
        return f"{sent} sent to {'an embedding' if limits.kind is ModelKind.EMBED else 'a generation'} model"
    if limits.kind is ModelKind.EMBED:
        return _embed_refusal(job.embed, limits)
    return _generation_refusal(job, num_delivered, limits)


def _embed_refusal(embed: jobs_pb2.EmbedTask, limits: JobLimits) -> str | None:
    if not embed.inputs:
        return "no inputs"
    for index, item in enumerate(embed.inputs):
        if not item.ids:
            return f"input {index} is empty"
        if max(item.ids) >= limits.vocab_size:
            return f"input {index}: token id {max(item.ids)} outside the vocabulary ({limits.vocab_size})"
        if len(item.ids) > limits.max_context:
            return f"input {index}: {len(item.ids)} tokens exceed the model's {limits.max_context}"
    return None


@functools.lru_cache(maxsize=256)
def _grammar_error(grammar: str) -> str:
    """llguidance's error for a grammar that does not compile ("" when it does, warnings or not)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""


def _generation_refusal(job: jobs_pb2.Job, num_delivered: int, limits: JobLimits) -> str | None:
    if not job.prompt_token_ids:
        return "empty prompt"
    ids = [
        *job.prompt_token_ids,
        *job.sampling.stop_token_ids,
        *job.sampling.logit_bias,
        *job.sampling.allowed_token_ids,
    ]
    if max(ids) >= limits.vocab_size:
        return f"token id {max(ids)} outside the vocabulary (size {limits.vocab_size})"
    sampling = job.sampling
    checks = {
        "max_tokens >= 1": sampling.max_tokens >= 1,
        "temperature finite and >= 0": math.isfinite(sampling.temperature) and sampling.temperature >= 0,
        "top_p in (0, 1]": 0 < sampling.top_p <= 1,
        "min_p in [0, 1]": 0 <= sampling.min_p <= 1,
        "repetition_penalty finite and > 0": math.isfinite(sampling.repetition_penalty)
        and sampling.repetition_penalty > 0,
        "presence_penalty finite": math.isfinite(sampling.presence_penalty),
        "frequency_penalty finite": math.isfinite(sampling.frequency_penalty),
        "top_k <= vocabulary size": sampling.top_k <= limits.vocab_size,
        "logprobs <= 20": sampling.logprobs <= 20,
        "prompt_logprobs <= 20": sampling.prompt_logprobs <= 20,
        "logit_bias finite": all(math.isfinite(bias) for bias in sampling.logit_bias.values()),
        f"n <= {MAX_CHOICES}": sampling.n <= MAX_CHOICES,
    }
    broken = [rule for rule, ok in checks.items() if not ok]
    if broken:
        return f"malformed sampling: {', '.join(broken)}"
    if sampling.n > limits.max_choices:
        return f"n = {sampling.n} choices exceed the {limits.max_choices} sequences this worker runs at once"
    if sampling.grammar and (problem := (limits.grammar_error or _grammar_error)(sampling.grammar)):
        return f"grammar does not compile: {problem}"
    num_tokens = len(job.prompt_token_ids) + num_delivered
    if num_tokens >= limits.max_context:
        return (
            f"{num_tokens} tokens leave no room to generate within the context limit of {limits.max_context}"
        )
    return None
