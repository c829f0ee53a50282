"""JobStream: the worker's side of Redis — jobs in, cancels in, token batches out, heartbeats, and
the group queries that claiming orphans takes. Every Redis call a worker makes is here.

Every write for a job is fenced by the worker's heartbeat (see `protos/redis_layout.py`): a worker
whose heartbeat expired gets `FencedOut` and must drop what it holds, because others may resume it.
"""

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from google.protobuf.message import DecodeError

from bootstrap.process import incarnation
from protos import jobs_pb2
from protos.redis_layout import (
    DEAD_MAXLEN,
    FIELD,
    FINISHED,
    GROUP,
    MAX_CHOICES,
    RESPONSES_MAXLEN,
    ChoiceProgress,
    StreamKeys,
    pack_tokens,
)
from worker import fenced_scripts
from worker.outbox import Ack, Burial, Outbox

logger = logging.getLogger(__name__)

_REMEMBERED_CANCELS = 10_000
_MAX_OWNED_LISTED = 10_000


class FencedOut(Exception):
    """This worker's heartbeat expired: it was presumed dead and its jobs may be running elsewhere."""


@dataclass(frozen=True, slots=True)
class ReceivedJob:
    """A job read from the group, with what is needed to answer and acknowledge it."""

    entry_id: bytes
    job: jobs_pb2.Job
    received_unix_ms: int
    progress: tuple[ChoiceProgress, ...] = ()  # by choice, what a previous worker already streamed back

    @property
    def num_choices(self) -> int:
        return num_choices(self.job)

    @property
    def num_delivered(self) -> int:
        """Tokens of its longest choice already streamed back."""
        return max((len(choice.token_ids) for choice in self.progress), default=0)


def num_choices(job: jobs_pb2.Job) -> int:
    """The job's choices, within the bound: a malformed n (refused later) must not size the Redis
    calls made for it first (reading its progress, dropping it)."""
    return min(max(job.sampling.n, 1), MAX_CHOICES)


def now_ms() -> int:
    return int(time.time() * 1000)


class JobStream:
    """Reads jobs through consumer group `workers` and every cancel of its model; publishes one XADD
    per gateway.

    The consumer name is the worker's name plus a random incarnation, so a restarted process (same
    host and pid in a container) never inherits the pending jobs of the one before it.
    """

    def __init__(
        self, client: redis.Redis, keys: StreamKeys, model: str, worker_name: str, progress_ttl_s: float
    ):
        self.client = client
        self.keys = keys
        self.model = model
        self.requests_key = keys.requests(model)
        self.cancel_key = keys.cancel(model)
        self.worker_name = worker_name
        self.worker_id = ""
        self.progress_ttl_ms = int(progress_ttl_s * 1000)
        self._registered = False
        self._cancel_cursor = b"$"
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._heartbeat_script = client.register_script(fenced_scripts.HEARTBEAT)
        self._publish_script = client.register_script(fenced_scripts.PUBLISH)
        self._forget_script = client.register_script(fenced_scripts.FORGET_CONSUMER)
        self.new_incarnation()

    def new_incarnation(self) -> None:
        """A fresh consumer name; the next heartbeat registers it."""
        self.worker_id = incarnation(self.worker_name)
        self._registered = False

    def join_group(self) -> None:
        """Create the group if missing (from the stream's start, so no early job is skipped); the
        first time, start reading cancels from now. Again after Redis lost its data, the group is
        back and cancels are read on from where they were."""
        try:
            self.client.xgroup_create(self.requests_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        if self._cancel_cursor == b"$":
            last = self.client.xrevrange(self.cancel_key, count=1)
            self._cancel_cursor = last[0][0] if last else b"0-0"

    def read(
        self, max_jobs: int, block_ms: int | None, outbox: Outbox
    ) -> tuple[list[ReceivedJob], list[jobs_pb2.Cancel]]:
        """New jobs (at most `max_jobs`, blocking up to `block_ms` if given) and cancels, one round
        trip; entries that are no job go to the outbox (see `parse_jobs`)."""
        pipe = self.client.pipeline(transaction=False)
        if max_jobs > 0:
            pipe.xreadgroup(GROUP, self.worker_id, {self.requests_key: ">"}, count=max_jobs, block=block_ms)
        pipe.xread({self.cancel_key: self._cancel_cursor}, count=1000)
        results = pipe.execute()
        cancels = self._take_cancels(results[-1])
        jobs = self.parse_jobs(results[0][0][1] if max_jobs > 0 and results[0] else [], outbox)
        return jobs, cancels

    def own_pending(self, outbox: Outbox) -> list[ReceivedJob]:
        """Every job this consumer was handed and has not acknowledged, with its progress: after a
        Redis error, a reply may have been lost between Redis handing jobs over and us reading them."""
        reply = self.client.xreadgroup(GROUP, self.worker_id, {self.requests_key: "0"}, count=10_000)
        return self.with_progress(self.parse_jobs(reply[0][1] if reply else [], outbox))

    def with_progress(self, received: list[ReceivedJob]) -> list[ReceivedJob]:
        """The jobs with what was already delivered of each choice, to resume where they stopped."""
        if not received:
            return []
        keys = [
            self.keys.progress(self.model, r.job.request_id, choice)
            for r in received
            for choice in range(r.num_choices)
        ]
        values = iter(self.client.mget(keys))
        return [
            dataclasses.replace(
                r, progress=tuple(ChoiceProgress.unpack(next(values)) for _ in range(r.num_choices))
            )
            for r in received
        ]

    def was_cancelled(self, request_id: str) -> bool:
        """True if a cancel (or stop) of the whole job arrived before the job did."""
        return request_id in self._recent_cancels

    def flush(self, outbox: Outbox) -> None:
        """Publish what the outbox holds and empty it; on an error it keeps everything."""
        if not outbox.is_empty:
            self.publish(outbox.batches, outbox.finished, outbox.buried, outbox.stopped)
            outbox.clear()

    def publish(
        self,
        batches: dict[str, list[jobs_pb2.TokenChunk]],
        finished: Iterable[Ack] = (),
        buried: Iterable[Burial] = (),
        stopped: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """One atomic script: each gateway's chunks, the progress they make (and the end of the
        `(request_id, choice, tokens)` choices stopped by their gateway), the acks of finished jobs
        and the burial of dead ones. Raises FencedOut, writing nothing, once this worker's
        heartbeat has expired."""
        finished, buried, stopped = list(finished), list(buried), list(stopped)
        if not batches and not finished and not buried and not stopped:
            return
        done = {ack.request_id: ack.num_choices for ack in finished if ack.request_id}
        response_keys, payloads = [], []
        # (request, choice) -> (first index, tokens from it): a choice that ended while its job
        # goes on gets FINISHED after its last tokens.
        progress: dict[tuple[str, int], tuple[int, list[int]]] = {}
        published_unix_us = time.time_ns() // 1000
        for gateway_id, chunks in batches.items():
            response_keys.append(self.keys.responses(self.model, gateway_id))
            payloads.append(
                jobs_pb2.TokenBatch(chunks=chunks, published_unix_us=published_unix_us).SerializeToString()
            )
            for chunk in chunks:
                if chunk.request_id in done or not (chunk.token_ids or chunk.finish_reason):
                    continue
                key = (chunk.request_id, chunk.choice_index)
                tokens = progress.setdefault(key, (chunk.index, []))[1]
                tokens.extend(chunk.token_ids)
                if chunk.finish_reason:
                    tokens.append(FINISHED)
        for request_id, choice, num_tokens in stopped:
            if request_id not in done:
                progress.setdefault((request_id, choice), (num_tokens, []))[1].append(FINISHED)
        keys = [
            self.keys.worker(self.model, self.worker_id),
            self.requests_key,
            self.keys.dead(self.model),
            *response_keys,
            *(self.keys.progress(self.model, request_id, choice) for request_id, choice in progress),
            *(
                self.keys.progress(self.model, request_id, choice)
                for request_id, count in done.items()
                for choice in range(count)
            ),
        ]
        args: list[bytes | str | int] = [
            GROUP,
            RESPONSES_MAXLEN,
            DEAD_MAXLEN,
            self.progress_ttl_ms,
            FIELD,
            self.worker_id,
            len(response_keys),
            len(progress),
            sum(done.values()),
            len(buried),
            *payloads,
        ]
        for first_index, token_ids in progress.values():
            args += [first_index * 4, pack_tokens(token_ids)]
        for burial in buried:
            args += [burial.payload, burial.reason]
        args += list(dict.fromkeys([ack.entry_id for ack in finished] + [b.entry_id for b in buried]))
        if not self._publish_script(keys=keys, args=args):
            raise FencedOut(f"heartbeat of {self.worker_id} expired")

    def heartbeat(self, status: jobs_pb2.WorkerStatus, ttl_s: float) -> None:
        """Refresh the heartbeat; FencedOut if it expired since the last one (it is not re-created)."""
        key = self.keys.worker(self.model, self.worker_id)
        args = [status.SerializeToString(), int(ttl_s * 1000), "0" if self._registered else "1"]
        if not self._heartbeat_script(keys=[key], args=args):
            raise FencedOut(f"heartbeat of {self.worker_id} expired")
        self._registered = True

    def remove_heartbeat(self) -> None:
        """Leave the fleet: whatever this worker still holds becomes claimable at once."""
        self.client.delete(self.keys.worker(self.model, self.worker_id))

    def missing_gateways(self, gateway_ids: set[str]) -> set[str]:
        """The gateways among these whose heartbeat has expired."""
        ordered = sorted(gateway_ids)
        if not ordered:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for gateway_id in ordered:
            pipe.exists(self.keys.gateway(gateway_id))
        return {g for g, exists in zip(ordered, pipe.execute(), strict=True) if not exists}

    def dead_consumers(self) -> list[tuple[str, int]]:
        """(name, pending entries) of the group's other consumers that have no heartbeat."""
        consumers = [
            (c["name"].decode(), int(c["pending"]))
            for c in self.client.xinfo_consumers(self.requests_key, GROUP)
            if c["name"].decode() != self.worker_id
        ]
        if not consumers:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name, _ in consumers:
            pipe.exists(self.keys.worker(self.model, name))
        return [c for c, alive in zip(consumers, pipe.execute(), strict=True) if not alive]

    def deliveries(self, consumer: str, count: int) -> dict[bytes, int]:
        """Up to `count` of a consumer's pending entries, each with how often it was delivered."""
        pending = self.client.xpending_range(self.requests_key, GROUP, "-", "+", count, consumername=consumer)
        return {p["message_id"]: int(p["times_delivered"]) for p in pending}

    def claim(
        self, entry_ids: list[bytes], min_idle_ms: int
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        """Take the entries over (XCLAIM); one claimed by someone else within `min_idle_ms` is left
        out. A job deleted from the stream meanwhile comes back with no fields, if it is now ours."""
        if not entry_ids:
            return []
        reply = self.client.xclaim(self.requests_key, GROUP, self.worker_id, min_idle_ms, entry_ids)
        claimed = [(entry_id, fields) for entry_id, fields in reply if entry_id is not None]
        if len(claimed) < len(reply):
            found = {entry_id for entry_id, _ in claimed}
            ours = self.deliveries(self.worker_id, _MAX_OWNED_LISTED)
            claimed += [
                (entry_id, None) for entry_id in entry_ids if entry_id in ours and entry_id not in found
            ]
        return claimed

    def forget_consumer(self, consumer: str) -> None:
        """Delete a dead consumer that holds nothing from the group (the script re-checks both)."""
        self._forget_script(
            keys=[self.requests_key, self.keys.worker(self.model, consumer)], args=[GROUP, consumer]
        )

    def parse_jobs(
        self, entries: list[tuple[bytes, dict[bytes, bytes] | None]], outbox: Outbox
    ) -> list[ReceivedJob]:
        """Decode stream entries. Malformed ones are buried with the reason; entries deleted from the
        stream (no fields) are acknowledged, as there is nothing left to run: both through the
        outbox, whose next flush writes them."""
        jobs: list[ReceivedJob] = []
        for entry_id, fields in entries:
            if not fields:
                outbox.acknowledge("", entry_id)
                continue
            payload = fields.get(FIELD, b"")
            problem = ""
            try:
                job = jobs_pb2.Job.FromString(payload)
            except DecodeError as error:
                problem = f"unreadable Job: {error}"
            else:
                if FIELD not in fields:
                    problem = f"no {FIELD.decode()!r} field in the entry"
                elif not job.request_id or not job.gateway_id:
                    problem = "malformed Job: no request_id or gateway_id"
            if problem:
                logger.warning("job %s buried: %s", entry_id, problem)
                outbox.bury(Burial(entry_id, payload, problem))
            else:
                jobs.append(ReceivedJob(entry_id, job, now_ms()))
        return jobs

    def _take_cancels(self, reply: list[object] | None) -> list[jobs_pb2.Cancel]:
        cancels: list[jobs_pb2.Cancel] = []
        for _stream, entries in reply or []:  # type: ignore[misc]
            for entry_id, fields in entries:
                self._cancel_cursor = entry_id
                try:
                    cancel = jobs_pb2.Cancel.FromString(fields.get(FIELD, b""))
                except DecodeError:
                    logger.warning("unreadable cancel %s ignored", entry_id)
                    continue
                cancels.append(cancel)
                if not cancel.HasField("choice_index"):  # one choice's stop leaves the job to run
                    self._recent_cancels[cancel.request_id] = None
        while len(self._recent_cancels) > _REMEMBERED_CANCELS:
            self._recent_cancels.popitem(last=False)
        return cancels
