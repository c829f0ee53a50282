"""ServingLoop: the worker's one loop — admit jobs, apply cancels, step the backend, publish, ack,
heartbeat, claim orphans — for a generation model and an embedding model alike."""

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from opentelemetry.trace import Tracer
from redis.exceptions import RedisError

from protos import inference_pb2, jobs_pb2
from protos.redis_layout import ChoiceProgress
from worker.backend import Backend
from worker.health import LoopHealth
from worker.job_check import refusal
from worker.job_codec import failure_chunk
from worker.job_spans import JobSpans
from worker.job_stream import FencedOut, JobStream, ReceivedJob, now_ms
from worker.orphan_claimer import OrphanClaimer
from worker.outbox import Burial, Outbox
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 10.0
_FIRST_RETRY_S = 0.1
_MAX_RETRY_S = 5.0


@dataclass(slots=True)
class _Running:
    """What the loop remembers of an admitted job, to route and acknowledge its output."""

    gateway_id: str
    entry_id: bytes
    started_unix_ms: int
    deadline_unix_ms: int
    spans: JobSpans
    num_choices: int
    open_choices: set[int]  # the job ends when the last of these does
    num_tokens: dict[int, int]  # by choice: tokens sent so far


class ServingLoop:
    """One thread owns the model and what feeds it (the backend); Redis is polled between steps,
    blocking only while nothing is due. Every Redis call goes through the job stream."""

    def __init__(
        self,
        backend: Backend,
        jobs: JobStream,
        settings: WorkerSettings,
        tracer: Tracer,
        metrics_url: str,
        health: LoopHealth,
    ):
        self.backend = backend
        self.metrics_url = metrics_url
        self.health = health
        self.jobs = jobs
        self.tracer = tracer
        self.claimer = OrphanClaimer(jobs, settings.claim_min_idle_ms, settings.max_job_attempts)
        self.settings = settings
        self.model_name = settings.served_model_name
        self._running: dict[str, _Running] = {}
        self._outbox = Outbox()
        self._retry_s = 0.0  # > 0 while Redis is failing: the next wait before trying again
        self._draining = threading.Event()
        self._next_heartbeat = 0.0
        self._num_finished = 0
        self._next_stats = time.monotonic() + _STATS_INTERVAL_S

    def drain(self) -> None:
        """Stop taking jobs; `run` returns once what was taken has finished or the grace period ends."""
        self._draining.set()
        self.health.ready = False

    def run(self) -> None:
        while not self._draining.is_set():
            try:
                self.jobs.join_group()
                self._send_heartbeat()  # before the first read: a consumer without one is an orphan
                break
            except RedisError as error:
                self._wait_for_redis(error)
        self._retry_s = 0.0
        logger.info("worker %s serving model %s", self.jobs.worker_id, self.model_name)
        drain_deadline: float | None = None
        try:
            while True:
                if self._draining.is_set():
                    drain_deadline = drain_deadline or time.monotonic() + self.settings.drain_timeout_s
                    if not self._running or time.monotonic() >= drain_deadline:
                        break
                self.step()
        finally:
            with contextlib.suppress(RedisError):
                self.jobs.remove_heartbeat()
        if self._running:
            logger.warning("drain timed out: %d jobs left pending for other workers", len(self._running))
        logger.info("worker %s stopped", self.jobs.worker_id)

    def step(self) -> None:
        """One turn of the loop. While Redis fails, nothing is computed: output waits in the outbox
        and the loop retries with backoff; once back, jobs Redis handed over unseen are adopted."""
        self.health.turned()
        try:
            self.jobs.flush(self._outbox)
            if self._retry_s:
                self._recover()
            self._admit_and_cancel()
            for chunk in self.backend.step():
                self._queue_chunk(chunk)
            self._expire_deadlines()
            self.jobs.flush(self._outbox)
            self._tick()
            self.health.ready = not self._draining.is_set()
        except FencedOut as error:
            self._abandon(error)
        except RedisError as error:
            self._wait_for_redis(error)

    def _wait_for_redis(self, error: RedisError) -> None:
        self.health.ready = False
        self.health.turned()  # waiting out an outage is not a stall
        if not self._retry_s:
            logger.error("Redis failed (%s); retrying with backoff, %d jobs held", error, len(self._running))
        self._retry_s = min(max(self._retry_s * 2, _FIRST_RETRY_S), _MAX_RETRY_S)
        time.sleep(self._retry_s)

    def _recover(self) -> None:
        """Redis answers again. A lost reply may have left jobs handed to us that we never saw (or
        claimed and not admitted): adopt every pending entry of ours that we do not hold."""
        self.jobs.join_group()  # a Redis that lost its data lost the group too
        known = {r.entry_id for r in self._running.values()} | self._outbox.entry_ids
        adopted = [job for job in self.jobs.own_pending(self._outbox) if job.entry_id not in known]
        self._admit_all(adopted)
        logger.warning("Redis is back; adopted %d jobs handed over unseen", len(adopted))
        self._retry_s = 0.0
        self._send_heartbeat()

    def _abandon(self, error: FencedOut) -> None:
        """Presumed dead: others may be resuming our jobs, so drop them all and rejoin as a new consumer."""
        logger.error("%s: dropping %d jobs for other workers to resume", error, len(self._running))
        for request_id in self._running:
            self.backend.abort(request_id)
        self._running.clear()
        self._outbox.clear()
        self.jobs.new_incarnation()
        self._retry_s = 0.0
        try:
            self._send_heartbeat()  # registers the new consumer before its first read
        except RedisError as error:  # Redis failed again (a failover settling): `_recover` registers it
            self._wait_for_redis(error)

    def _admit_and_cancel(self) -> None:
        """Read jobs and cancels; jobs refused at once get their last chunk in the outbox."""
        accepting = not self._draining.is_set()
        block_ms = self.backend.block_ms(self.settings.idle_block_ms)
        received, cancels = self.jobs.read(self._capacity() if accepting else 0, block_ms, self._outbox)
        for cancel in cancels:
            if cancel.stopped and cancel.HasField("choice_index"):
                self._choice_stopped_by_gateway(cancel.request_id, cancel.choice_index)
            elif cancel.stopped:
                self._stopped_by_gateway(cancel.request_id)
            else:
                self._finish_early(cancel.request_id, jobs_pb2.JOB_FAILURE_CANCELLED, "cancelled")
        self._admit_all(received)

    def _admit_all(self, received: list[ReceivedJob]) -> None:
        for item in received:
            if item.job.request_id in self._running:  # queued twice (an XADD retried after a lost reply)
                logger.warning("duplicate job for request_id=%s dropped", item.job.request_id)
                self._outbox.acknowledge("", item.entry_id)
                continue
            failure = self._admit(item)
            if failure is not None:
                self._outbox.add(item.job.gateway_id, failure, item.entry_id, item.num_choices)

    def _admit(self, item: ReceivedJob) -> jobs_pb2.TokenChunk | None:
        """Start a job, or return the chunk that ends it at once."""
        job = item.job
        problem = refusal(job, item.num_delivered, self.backend.limits)
        if problem is not None:
            logger.warning("job %s request_id=%s buried: %s", item.entry_id, job.request_id, problem)
            self._outbox.bury(Burial(item.entry_id, job.SerializeToString(), problem))
            return failure_chunk(job.request_id, jobs_pb2.JOB_FAILURE_INVALID, problem)
        if self.jobs.was_cancelled(job.request_id):
            return failure_chunk(
                job.request_id, jobs_pb2.JOB_FAILURE_CANCELLED, "cancelled before it started"
            )
        if job.deadline_unix_ms and job.deadline_unix_ms <= item.received_unix_ms:
            return failure_chunk(
                job.request_id, jobs_pb2.JOB_FAILURE_DEADLINE, "deadline passed while queued"
            )
        progress = item.progress or tuple(ChoiceProgress() for _ in range(item.num_choices))
        open_choices = {c for c, choice in enumerate(progress) if not choice.finished}
        if not open_choices:  # every choice had its last chunk: the job was done
            self._outbox.acknowledge(job.request_id, item.entry_id, item.num_choices)
            return None
        self.backend.start(job, item.progress)
        self._running[job.request_id] = _Running(
            job.gateway_id,
            item.entry_id,
            item.received_unix_ms,
            job.deadline_unix_ms,
            JobSpans.of(job, item.received_unix_ms),
            item.num_choices,
            open_choices,
            {c: len(choice.token_ids) for c, choice in enumerate(progress)},
        )
        return None

    def _capacity(self) -> int:
        """Jobs to take now: only what can run, so idle workers in the group get the rest; a job
        of n choices takes n places."""
        return self.backend.max_jobs - sum(len(running.open_choices) for running in self._running.values())

    def _release(self, request_id: str, error: str | None) -> _Running | None:
        """Take a running job out of the backend now (its blocks freed) and end its spans."""
        running = self._running.pop(request_id, None)
        if running is not None:
            self.backend.abort(request_id)
            running.spans.end(self.tracer, self.jobs.worker_id, error)
        return running

    def _finish_early(self, request_id: str, failure: int, message: str) -> None:
        """Cancel or expire a running job: free it, tell its gateway, acknowledge it."""
        running = self._release(request_id, message)
        if running is not None:
            logger.info("job ended early: %s", message, extra=running.spans.log_fields(request_id))
            chunk = failure_chunk(request_id, failure, message)
            self._outbox.add(running.gateway_id, chunk, running.entry_id, running.num_choices)

    def _stopped_by_gateway(self, request_id: str) -> None:
        """The gateway matched a stop string and answered its client: the job is done. Free it and
        acknowledge it; nothing more goes out for it."""
        running = self._release(request_id, None)
        if running is not None:
            fields = running.spans.log_fields(request_id)
            logger.info("job finished (stop): its gateway matched a stop string", extra=fields)
            self._outbox.acknowledge(request_id, running.entry_id, running.num_choices)
            self._num_finished += 1

    def _choice_stopped_by_gateway(self, request_id: str, choice_index: int) -> None:
        """The gateway matched a stop string in one choice: end that one, and say so in the job's
        progress so that a resume does not run it again; the job is done once no choice is left."""
        running = self._running.get(request_id)
        if running is None or choice_index not in running.open_choices:
            return
        self.backend.finish_choice(request_id, choice_index)
        running.open_choices.discard(choice_index)
        if running.open_choices:
            self._outbox.stop_choice(request_id, choice_index, running.num_tokens[choice_index])
        else:
            self._stopped_by_gateway(request_id)

    def _expire_deadlines(self) -> None:
        now = now_ms()
        expired = [
            rid for rid, r in self._running.items() if r.deadline_unix_ms and r.deadline_unix_ms <= now
        ]
        for request_id in expired:
            self._finish_early(request_id, jobs_pb2.JOB_FAILURE_DEADLINE, "deadline exceeded")

    def _queue_chunk(self, message: jobs_pb2.TokenChunk) -> None:
        running = self._running[message.request_id]
        if message.index == 0:
            message.started_unix_ms = running.started_unix_ms  # the first chunk says when the job began
        running.spans.token_produced()
        running.num_tokens[message.choice_index] = message.index + len(message.token_ids)
        if message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            running.open_choices.discard(message.choice_index)
        if message.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED or running.open_choices:
            self._outbox.add(running.gateway_id, message)
            return
        running.spans.end(self.tracer, self.jobs.worker_id)
        logger.info(
            "job finished (%s): %s",
            inference_pb2.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower(),
            f"{len(message.embeddings)} vectors"
            if message.embeddings
            else f"{message.index + len(message.token_ids)} tokens"
            + (
                f" (choice {message.choice_index}, the last of {running.num_choices})"
                if running.num_choices > 1
                else ""
            ),
            extra=running.spans.log_fields(message.request_id),
        )
        self._outbox.add(running.gateway_id, message, running.entry_id, running.num_choices)
        del self._running[message.request_id]
        self._num_finished += 1

    def _tick(self) -> None:
        """Once per heartbeat interval: heartbeat, drop the work of lost gateways, claim orphans."""
        now = time.monotonic()
        if now >= self._next_stats:
            self._log_stats()
            self._next_stats = now + _STATS_INTERVAL_S
        if now < self._next_heartbeat:
            return
        self._send_heartbeat()
        self.backend.refresh_metrics()
        self._drop_work_of_lost_gateways()
        capacity = self._capacity()
        if capacity > 0 and not self._draining.is_set():
            self._admit_all(self.claimer.claim(capacity, self._outbox))

    def _drop_work_of_lost_gateways(self) -> None:
        """No one would hear the answer: cancel and acknowledge without publishing."""
        lost = self.jobs.missing_gateways({r.gateway_id for r in self._running.values()})
        if not lost:
            return
        dropped = [rid for rid, r in self._running.items() if r.gateway_id in lost]
        logger.warning("gateways %s are gone: cancelling their %d jobs", sorted(lost), len(dropped))
        for request_id in dropped:
            self.backend.abort(request_id)
            running = self._running.pop(request_id)
            self._outbox.acknowledge(request_id, running.entry_id, running.num_choices)

    def _send_heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.settings.heartbeat_interval_s
        status = jobs_pb2.WorkerStatus(
            worker_id=self.jobs.worker_id,
            model=self.model_name,
            max_context=self.backend.limits.max_context,
            accepting=not self._draining.is_set(),
            updated_unix_ms=now_ms(),
            num_finished=self._num_finished,
            metrics_url=self.metrics_url,
        )
        self.backend.load(status)
        self.jobs.heartbeat(status, self.settings.heartbeat_ttl_s)

    def _log_stats(self) -> None:
        logger.info("%s", self.backend.stats_line())
