"""The gateway's call path — admission, the job it submits, the chunks back, the frames out, and
what every call leaves behind (a log line, an ended trace, a released lease) — against a real
redis-server, with this test playing the worker: it reads each job off the stream and answers
on the gateway's response stream."""

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from checkpoints import ModelKind
from client.redis_server import RedisServer
from gateway.admission import Admission
from gateway.call_context import CallContext, Caller
from gateway.errors import GatewayError
from gateway.fleet import FleetMonitor
from gateway.job_watch import WatchPolicy
from gateway.load_limits import LimitSettings, LoadLimits
from gateway.metrics import GatewayMetrics
from gateway.queues import GatewayQueues
from gateway.served_models import ServedModel, ServedModels
from protos import inference_pb2, jobs_pb2
from protos.redis_layout import FIELD, StreamKeys

GENERATOR, EMBEDDER = "gen", "emb"
CALLER = Caller("tester", None)
_namespaces = itertools.count()


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


Scenario = Callable[[CallContext], Awaitable[None]]


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def metrics(registry: CollectorRegistry) -> GatewayMetrics:
    return GatewayMetrics(registry, 2048)


@pytest.fixture(scope="module")
def models(model_dir: Path, embedder_dir: Path, metrics: GatewayMetrics) -> ServedModels:
    return ServedModels(
        [
            ServedModel.of(GENERATOR, model_dir, ModelKind.GENERATE, metrics.model(GENERATOR), 2048),
            ServedModel.of(EMBEDDER, embedder_dir, ModelKind.EMBED, metrics.model(EMBEDDER), 256),
        ]
    )


@pytest.fixture()
def on_gateway(
    redis_server: RedisServer, models: ServedModels, metrics: GatewayMetrics, spans: InMemorySpanExporter
) -> Callable[[Scenario], None]:
    """Runs a scenario against a fresh gateway context (its own namespace) on a fresh event loop."""

    async def run(scenario: Scenario) -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        keys = StreamKeys(f"call{next(_namespaces)}")
        queues = GatewayQueues(client, keys, "gw", [GENERATOR, EMBEDDER], metrics.response_transit)
        limits = LoadLimits(LimitSettings(100, 100, 0, 0.0, 1000))
        fleet = FleetMonitor(queues, models, health.aio.HealthServicer(), 1.0, 5.0, limits, "")
        tracers = TracerProvider()
        tracers.add_span_processor(SimpleSpanProcessor(spans))
        executor = ThreadPoolExecutor(2)
        await queues.start()
        try:
            tracer = tracers.get_tracer("t")
            await scenario(
                CallContext(models, queues, fleet, limits, executor, tracer, WatchPolicy(5.0, 30.0), 16)
            )
        finally:
            await queues.stop()
            await client.aclose()
            executor.shutdown()

    return lambda scenario: asyncio.run(run(scenario))


async def next_job(context: CallContext, model: str) -> jobs_pb2.Job:
    """The next job a worker would read off the model's stream."""
    client, key = context.queues.client, context.queues.keys.requests(model)
    for _ in range(1000):
        entries = await client.xrange(key)
        if entries:
            await client.xdel(key, entries[0][0])  # as a worker acknowledges it
            return jobs_pb2.Job.FromString(entries[0][1][FIELD])
        await asyncio.sleep(0.01)
    raise AssertionError("no job was submitted")


async def answer(context: CallContext, *chunks: jobs_pb2.TokenChunk, model: str = GENERATOR) -> None:
    """As a worker publishes: one batch, stamped with when it was sent."""
    batch = jobs_pb2.TokenBatch(chunks=chunks, published_unix_us=time.time_ns() // 1000).SerializeToString()
    await context.queues.client.xadd(context.queues.keys.responses(model, "gw"), {FIELD: batch})


async def cancels(context: CallContext) -> list[tuple[str, bool]]:
    """(request id, stopped) of every cancel published."""
    entries = await context.queues.client.xrange(context.queues.keys.cancel(GENERATOR))
    return [(c.request_id, c.stopped) for c in (jobs_pb2.Cancel.FromString(f[FIELD]) for _, f in entries)]


def chunk(job: jobs_pb2.Job, index: int, token_ids: list[int], **fields: object) -> jobs_pb2.TokenChunk:
    return jobs_pb2.TokenChunk(
        request_id=job.request_id,
        index=index,
        token_ids=token_ids,
        prompt_tokens=len(job.prompt_token_ids),
        **fields,  # type: ignore[arg-type]
    )


def generate_request(**sampling: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id="mine",
        prompt="The capital of France is",
        sampling=inference_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def frames(
    context: CallContext, request: inference_pb2.GenerateRequest
) -> list[inference_pb2.GenerateResponse]:
    generation = await Admission(context).generation(request, 30.0, CALLER, Context())
    return [frame async for frame in generation.run()]


def test_a_generation_streams_its_chunks_and_ends_cleanly(
    on_gateway: Callable[[Scenario], None],
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    registry: CollectorRegistry,
) -> None:
    transits_before = registry.get_sample_value("conveyor:response_transit_seconds_count") or 0.0

    async def scenario(context: CallContext) -> None:
        ids = context.models.resolve(GENERATOR, None).tokenizer.encode(" Paris, a city")
        running = asyncio.create_task(frames(context, generate_request(max_tokens=len(ids))))
        job = await next_job(context, GENERATOR)
        assert job.gateway_id == "gw" and job.sampling.max_tokens == len(ids) and job.trace_context
        await answer(context, chunk(job, 0, ids[:1], started_unix_ms=1))
        with caplog.at_level(logging.INFO, logger="gateway.job_call"):
            await answer(context, chunk(job, 1, ids[1:], finish_reason=inference_pb2.FINISH_REASON_LENGTH))
            out = await running
        assert "".join(f.text for f in out) == " Paris, a city"
        assert [f.index for f in out] == [0, 1] and out[
            -1
        ].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert out[-1].usage.completion_tokens == len(ids) and all(f.request_id == "mine" for f in out)
        assert context.load_limits.in_flight == 0, "the lease is released"
        assert await cancels(context) == [], "a finished job is not cancelled"
        (root,) = [s for s in spans.get_finished_spans() if s.name == "conveyor.generate"]
        assert root.status.is_ok and root.attributes is not None
        assert root.attributes["conveyor.request_id"] == job.request_id
        assert "generation finished after" in caplog.text

    on_gateway(scenario)
    transits = registry.get_sample_value("conveyor:response_transit_seconds_count")
    assert transits == transits_before + 2, "each batch's transit is observed"


def test_a_stop_string_ends_the_generation_at_the_gateway_and_cancels_the_job(
    on_gateway: Callable[[Scenario], None],
) -> None:
    async def scenario(context: CallContext) -> None:
        tokenizer = context.models.resolve(GENERATOR, None).tokenizer
        ids = tokenizer.encode(" Paris. It is big")
        running = asyncio.create_task(frames(context, generate_request(max_tokens=20, stop=["."])))
        job = await next_job(context, GENERATOR)
        await answer(context, *(chunk(job, index, [token]) for index, token in enumerate(ids)))
        out = await running
        assert "".join(f.text for f in out) == " Paris"
        assert out[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
        assert tokenizer.decode([t for f in out for t in f.token_ids]) == " Paris.", "tokens end at the stop"
        assert await cancels(context) == [(job.request_id, True)], "the job is stopped, not cancelled"
        assert context.load_limits.in_flight == 0

    on_gateway(scenario)


def test_tokens_lost_on_the_way_end_the_call_instead_of_leaving_a_gap(
    on_gateway: Callable[[Scenario], None],
) -> None:
    async def scenario(context: CallContext) -> None:
        running = asyncio.create_task(frames(context, generate_request(max_tokens=8)))
        job = await next_job(context, GENERATOR)
        await answer(context, chunk(job, 0, [42]), chunk(job, 2, [43]))  # index 1 never arrives
        with pytest.raises(GatewayError) as error:
            await running
        assert (
            error.value.code == grpc.StatusCode.UNAVAILABLE
            and "tokens 1 to 1 were lost" in error.value.message
        )
        assert await cancels(context) == [(job.request_id, False)] and context.load_limits.in_flight == 0

    on_gateway(scenario)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (jobs_pb2.JOB_FAILURE_INVALID, grpc.StatusCode.INVALID_ARGUMENT),
        (jobs_pb2.JOB_FAILURE_CANCELLED, grpc.StatusCode.CANCELLED),
        (jobs_pb2.JOB_FAILURE_DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED),
        (jobs_pb2.JOB_FAILURE_WORKERS_DIED, grpc.StatusCode.INTERNAL),
        (jobs_pb2.JOB_FAILURE_UNSPECIFIED, grpc.StatusCode.INTERNAL),
    ],
)
def test_a_worker_failure_becomes_the_status_of_its_row(
    on_gateway: Callable[[Scenario], None], spans: InMemorySpanExporter, failure: int, code: grpc.StatusCode
) -> None:
    async def scenario(context: CallContext) -> None:
        running = asyncio.create_task(frames(context, generate_request(max_tokens=4)))
        job = await next_job(context, GENERATOR)
        last = chunk(job, 0, [], finish_reason=inference_pb2.FINISH_REASON_ERROR, failure=failure)
        last.failure_message = "what happened"
        await answer(context, last)
        with pytest.raises(GatewayError) as error:
            await running
        assert error.value.code == code and error.value.message == "what happened"
        assert context.load_limits.in_flight == 0
        (root,) = [s for s in spans.get_finished_spans() if s.name == "conveyor.generate"]
        assert not root.status.is_ok and root.status.description == "what happened"

    on_gateway(scenario)


def test_a_client_that_leaves_early_cancels_its_job(
    on_gateway: Callable[[Scenario], None], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(context: CallContext) -> None:
        request = generate_request(max_tokens=8)
        generation = await Admission(context).generation(request, 30.0, CALLER, Context())
        responses = generation.run()
        first = asyncio.ensure_future(anext(responses))
        job = await next_job(context, GENERATOR)
        await answer(context, chunk(job, 0, [42]))
        assert list((await first).token_ids) == [42]
        with caplog.at_level(logging.INFO, logger="gateway.job_call"):
            await responses.aclose()
        assert await cancels(context) == [(job.request_id, False)]
        assert context.load_limits.in_flight == 0 and "generation ended early" in caplog.text

    on_gateway(scenario)


def test_an_embedding_call_takes_the_same_path(
    on_gateway: Callable[[Scenario], None], spans: InMemorySpanExporter
) -> None:
    async def scenario(context: CallContext) -> None:
        request = inference_pb2.EmbedRequest(inputs=["first", "second"])
        call = await Admission(context).embedding(request, None, CALLER, Context())
        running = asyncio.create_task(call.run())
        job = await next_job(context, EMBEDDER)
        assert len(job.embed.inputs) == 2 and job.deadline_unix_ms == 0
        last = chunk(job, 0, [], finish_reason=inference_pb2.FINISH_REASON_STOP)
        last.prompt_tokens = 6
        last.embeddings.add(values=[1.0, 0.0])
        last.embeddings.add(values=[0.0, 1.0])
        await answer(context, last, model=EMBEDDER)
        response = await running
        assert [list(e.values) for e in response.embeddings] == [[1.0, 0.0], [0.0, 1.0]]
        assert response.model == EMBEDDER and response.usage.prompt_tokens == 6
        assert response.request_id == job.request_id, "no client id: the job's"
        assert context.load_limits.in_flight == 0
        assert [s.name for s in spans.get_finished_spans() if s.parent is None] == ["conveyor.embed"]

    on_gateway(scenario)


def test_a_refused_request_takes_no_lease_and_submits_nothing(
    on_gateway: Callable[[Scenario], None], spans: InMemorySpanExporter
) -> None:
    async def scenario(context: CallContext) -> None:
        with pytest.raises(GatewayError) as error:
            await frames(context, generate_request(top_p=2.0))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.message.startswith("sampling.top_p")
        assert context.load_limits.in_flight == 0
        assert await context.queues.client.xlen(context.queues.keys.requests(GENERATOR)) == 0
        (root,) = spans.get_finished_spans()[-1:]
        assert root.name == "conveyor.generate" and not root.status.is_ok

    on_gateway(scenario)


def test_a_cancel_in_the_same_turn_as_a_chunk_still_cancels_the_job(
    on_gateway: Callable[[Scenario], None],
) -> None:
    """A chunk and the call's cancel land in one turn of the event loop: the cancel wins. (Python
    3.11's asyncio.wait_for handed the chunk back and dropped the cancel, so a cancelled request
    with n choices ran on to its last token.)"""

    async def scenario(context: CallContext) -> None:
        registered: list[asyncio.Queue[jobs_pb2.TokenChunk]] = []
        register = context.queues.register

        def remember(request_id: str) -> asyncio.Queue[jobs_pb2.TokenChunk]:
            registered.append(register(request_id))
            return registered[-1]

        context.queues.register = remember  # type: ignore[method-assign]
        generation = await Admission(context).generation(
            generate_request(max_tokens=8), 30.0, CALLER, Context()
        )
        responses = generation.run()
        reader = asyncio.ensure_future(anext(responses))
        job = await next_job(context, GENERATOR)
        await asyncio.sleep(0.05)  # the reader waits on its queue
        registered[0].put_nowait(chunk(job, 0, [42]))
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await responses.aclose()
        assert await cancels(context) == [(job.request_id, False)]

    on_gateway(scenario)
