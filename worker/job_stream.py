"""JobStream: the worker's side of Redis — jobs in, cancels in, token batches out, heartbeats.

Protobuf stops here: jobs become `Sequence`s and scheduler `TokenChunk`s become proto chunks.
"""

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis
from google.protobuf.message import DecodeError

from protos import inference_pb2, jobs_pb2
from protos.streams import DEAD_MAXLEN, FIELD, GROUP, RESPONSES_MAXLEN, StreamKeys
from scheduler import FinishReason, SamplingParams, Sequence, TokenChunk

logger = logging.getLogger(__name__)

_FINISH_TO_PROTO = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}
_REMEMBERED_CANCELS = 10_000


@dataclass(frozen=True, slots=True)
class ReceivedJob:
    """A job read from the group, with what is needed to answer and acknowledge it."""

    entry_id: bytes
    job: jobs_pb2.Job
    received_unix_ms: int


def now_ms() -> int:
    return int(time.time() * 1000)


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


def sequence_from_job(job: jobs_pb2.Job) -> Sequence:
    return Sequence(
        request_id=job.request_id,
        prompt_token_ids=list(job.prompt_token_ids),
        sampling=sampling_from_proto(job.sampling),
        priority=job.priority,
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


class JobStream:
    """Reads jobs through consumer group `workers`, reads every cancel, publishes one XADD per gateway."""

    def __init__(self, client: redis.Redis, keys: StreamKeys, model: str, worker_id: str):
        self.client = client
        self.keys = keys
        self.requests_key = keys.requests(model)
        self.worker_id = worker_id
        self._cancel_cursor = b"$"
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()

    def join_group(self) -> None:
        """Create the group if missing (from the stream's start, so no early job is skipped)."""
        try:
            self.client.xgroup_create(self.requests_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        last = self.client.xrevrange(self.keys.cancel, count=1)
        self._cancel_cursor = last[0][0] if last else b"0-0"

    def read(self, max_jobs: int, block_ms: int | None) -> tuple[list[ReceivedJob], list[str]]:
        """New jobs (at most `max_jobs`, blocking up to `block_ms` if given) and cancels, one round trip."""
        pipe = self.client.pipeline(transaction=False)
        if max_jobs > 0:
            pipe.xreadgroup(GROUP, self.worker_id, {self.requests_key: ">"}, count=max_jobs, block=block_ms)
        pipe.xread({self.keys.cancel: self._cancel_cursor}, count=1000)
        results = pipe.execute()
        cancels = self._take_cancels(results[-1])
        jobs = self._parse_jobs(results[0]) if max_jobs > 0 else []
        return jobs, cancels

    def was_cancelled(self, request_id: str) -> bool:
        """True if a cancel for this id arrived before its job did."""
        return request_id in self._recent_cancels

    def publish(self, batches: dict[str, list[jobs_pb2.TokenChunk]], finished_entry_ids: list[bytes]) -> None:
        """One XADD per gateway, then acknowledge finished jobs, in one pipelined round trip."""
        if not batches and not finished_entry_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for gateway_id, chunks in batches.items():
            payload = jobs_pb2.TokenBatch(chunks=chunks).SerializeToString()
            pipe.xadd(
                self.keys.responses(gateway_id), {FIELD: payload}, maxlen=RESPONSES_MAXLEN, approximate=True
            )
        if finished_entry_ids:
            self._acknowledge(pipe, finished_entry_ids)
        pipe.execute()

    def bury(self, entry_id: bytes, payload: bytes, reason: str) -> None:
        """Move an unreadable job to the dead stream, with why, and acknowledge it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(
            self.keys.dead,
            {b"job": payload, b"reason": reason, b"worker": self.worker_id},
            maxlen=DEAD_MAXLEN,
            approximate=True,
        )
        self._acknowledge(pipe, [entry_id])
        pipe.execute()

    def _acknowledge(self, pipe: redis.client.Pipeline, entry_ids: list[bytes]) -> None:
        """XACK, then XDEL: the stream holds only unfinished jobs, so its length is the queue depth."""
        pipe.xack(self.requests_key, GROUP, *entry_ids)
        pipe.xdel(self.requests_key, *entry_ids)

    def heartbeat(self, status: jobs_pb2.WorkerStatus, ttl_s: float) -> None:
        key = self.keys.worker(self.worker_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping={"status": status.SerializeToString(), "model": status.model})
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.execute()

    def remove_heartbeat(self) -> None:
        self.client.delete(self.keys.worker(self.worker_id))

    def _parse_jobs(self, reply: list[object] | None) -> list[ReceivedJob]:
        jobs: list[ReceivedJob] = []
        for _stream, entries in reply or []:  # type: ignore[misc]
            for entry_id, fields in entries:
                payload = fields.get(FIELD, b"")
                try:
                    job = jobs_pb2.Job.FromString(payload)
                except DecodeError as error:
                    logger.warning("unreadable job %s buried: %s", entry_id, error)
                    self.bury(entry_id, payload, f"unreadable Job: {error}")
                    continue
                jobs.append(ReceivedJob(entry_id, job, now_ms()))
        return jobs

    def _take_cancels(self, reply: list[object] | None) -> list[str]:
        request_ids: list[str] = []
        for _stream, entries in reply or []:  # type: ignore[misc]
            for entry_id, fields in entries:
                self._cancel_cursor = entry_id
                try:
                    request_id = jobs_pb2.Cancel.FromString(fields.get(FIELD, b"")).request_id
                except DecodeError:
                    logger.warning("unreadable cancel %s ignored", entry_id)
                    continue
                request_ids.append(request_id)
                self._recent_cancels[request_id] = None
        while len(self._recent_cancels) > _REMEMBERED_CANCELS:
            self._recent_cancels.popitem(last=False)
        return request_ids
