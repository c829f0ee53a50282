"""Protobuf stops here: jobs become scheduler `Sequence`s, and what the engines produce becomes
proto chunks."""

from protos import inference_pb2, jobs_pb2
from protos.redis_layout import ChoiceProgress
from scheduler import FinishReason, SampledToken, SamplingParams, Sequence, TokenChunk

_FINISH_TO_PROTO = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
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
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs if sampling.logprobs >= 0 else None,
        grammar=sampling.grammar,
        logit_bias=tuple(sorted(sampling.logit_bias.items())),
        allowed_token_ids=tuple(sampling.allowed_token_ids),
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
        n=max(sampling.n, 1),
    )


def sequences_from_job(job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...] = ()) -> list[Sequence]:
    """A job's sequences. The choices with nothing delivered are one sequence that forks them off at
    its first sample; a resumed choice starts with the tokens its client already has; a finished
    one has none."""
    sampling = sampling_from_proto(job.sampling)
    prompt = list(job.prompt_token_ids)
    progress = progress or tuple(ChoiceProgress() for _ in range(sampling.n))
    fresh = [c for c, choice in enumerate(progress) if not choice.token_ids and not choice.finished]
    seqs = [
        Sequence(
            job.request_id,
            prompt,
            sampling,
            c,
            priority=job.priority,
            output_token_ids=list(choice.token_ids),
        )
        for c, choice in enumerate(progress)
        if choice.token_ids and not choice.finished
    ]
    if fresh:
        seqs.append(
            Sequence(job.request_id, prompt, sampling, fresh[0], tuple(fresh[1:]), priority=job.priority)
        )
    return seqs


def chunk_to_proto(chunk: TokenChunk) -> jobs_pb2.TokenChunk:
    message = jobs_pb2.TokenChunk(
        request_id=chunk.request_id,
        index=chunk.index,
        token_ids=chunk.token_ids,
        finish_reason=_FINISH_TO_PROTO[chunk.finish_reason],
        prompt_tokens=chunk.num_prompt_tokens,
        choice_index=chunk.choice_index,
    )
    for token in chunk.tokens:
        if token.logprob is not None:
            message.logprobs.append(_token_logprobs(token))
    message.prompt_logprobs.extend(_token_logprobs(token) for token in chunk.prompt_logprobs)
    return message


def _token_logprobs(token: SampledToken) -> inference_pb2.TokenLogprobs:
    return inference_pb2.TokenLogprobs(
        token_id=token.token_id,
        logprob=token.logprob or 0.0,
        top=[inference_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs],
    )


def embedded_chunk(request_id: str, vectors: list[list[float]], prompt_tokens: int) -> jobs_pb2.TokenChunk:
    """An embedding call's only chunk: every vector, in the call's order."""
    return jobs_pb2.TokenChunk(
        request_id=request_id,
        finish_reason=inference_pb2.FINISH_REASON_STOP,
        prompt_tokens=prompt_tokens,
        embeddings=[inference_pb2.Embedding(values=vector) for vector in vectors],
    )


def failure_chunk(request_id: str, failure: int, message: str) -> jobs_pb2.TokenChunk:
    """The last chunk of a job that did not finish: the reason from the queue contract, never a
    status code (the gateway picks that)."""
    return jobs_pb2.TokenChunk(
        request_id=request_id,
        finish_reason=inference_pb2.FINISH_REASON_ERROR,
        failure=failure,
        failure_message=message,
    )
