"""Protobuf stops here: jobs become scheduler `Sequence`s and scheduler `TokenChunk`s become proto chunks."""

import math

from protos import inference_pb2, jobs_pb2
from scheduler import FinishReason, SamplingParams, Sequence, TokenChunk

_FINISH_TO_PROTO = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(sampling: jobs_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs if sampling.logprobs >= 0 else None,
    )


def sequence_from_job(job: jobs_pb2.Job, delivered_token_ids: tuple[int, ...] = ()) -> Sequence:
    """A job's sequence; a resumed job starts with the tokens its client already has."""
    return Sequence(
        request_id=job.request_id,
        prompt_token_ids=list(job.prompt_token_ids),
        sampling=sampling_from_proto(job.sampling),
        priority=job.priority,
        output_token_ids=list(delivered_token_ids),
    )


def chunk_to_proto(chunk: TokenChunk) -> jobs_pb2.TokenChunk:
    message = jobs_pb2.TokenChunk(
        request_id=chunk.request_id,
        index=chunk.index,
        token_ids=chunk.token_ids,
        finish_reason=_FINISH_TO_PROTO[chunk.finish_reason],
        stop_string=chunk.stop_string or "",
        prompt_tokens=chunk.num_prompt_tokens,
    )
    for token in chunk.tokens:
        if token.logprob is not None:
            message.logprobs.add(
                token_id=token.token_id,
                logprob=token.logprob,
                top=[inference_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs],
            )
    return message


def error_chunk(request_id: str, code: int, message: str) -> jobs_pb2.TokenChunk:
    return jobs_pb2.TokenChunk(
        request_id=request_id,
        finish_reason=inference_pb2.FINISH_REASON_ERROR,
        error=inference_pb2.Error(code=code, message=message),
    )


def job_problem(job: jobs_pb2.Job, vocab_size: int) -> str | None:
    """Why a job cannot run at all, or None. Gateways validate requests, but anything can write to
    the stream: a job that would crash the model (an id outside the embedding, a NaN temperature)
    is caught here and buried instead."""
    if not job.prompt_token_ids:
        return "empty prompt"
    ids = [*job.prompt_token_ids, *job.sampling.stop_token_ids]
    if max(ids) >= vocab_size:
        return f"token id {max(ids)} outside the vocabulary (size {vocab_size})"
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
        "top_k <= vocabulary size": sampling.top_k <= vocab_size,
        "logprobs <= 20": sampling.logprobs <= 20,
    }
    broken = [rule for rule, ok in checks.items() if not ok]
    return f"malformed sampling: {', '.join(broken)}" if broken else None
