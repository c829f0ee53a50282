"""The public API over real gRPC, a real gateway, a real worker, real Redis and the real model."""

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.library import AsyncConveyorClient, ConveyorClient, build_request
from protos import inference_pb2, inference_pb2_grpc, jobs_pb2
from protos.redis_layout import FIELD, StreamKeys
from tests.e2e.cluster import wait_for, worker_statuses
from tests.e2e.conftest import Cluster

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def collect(
    responses: Iterator[inference_pb2.GenerateResponse],
) -> tuple[str, list[int], list[inference_pb2.GenerateResponse]]:
    frames = list(responses)
    return "".join(f.text for f in frames), [t for f in frames for t in f.token_ids], frames


def test_chat_request_answers_with_paris_and_reports_usage(stub: inference_pb2_grpc.InferenceStub) -> None:
    request = build_request(messages=FRANCE, max_tokens=20, temperature=0.0)
    text, token_ids, frames = collect(stub.Generate(request))
    assert "Paris" in text
    last = frames[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert last.usage.completion_tokens == len(token_ids)
    assert last.usage.prompt_tokens > 20
    assert 0 < last.timings.time_to_first_token_s <= last.timings.total_s
    indexes = [f.index for f in frames if f.token_ids]
    assert indexes == sorted(indexes) and indexes[0] == 0


def test_length_limit_and_stop_strings(stub: inference_pb2_grpc.InferenceStub, cluster: Cluster) -> None:
    _, tokens, frames = collect(
        stub.Generate(build_request("Once upon a time", max_tokens=7, temperature=0.0, ignore_eos=True))
    )
    assert len(tokens) == 7 and frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    text, _, frames = collect(
        stub.Generate(build_request(messages=FRANCE, max_tokens=30, temperature=0.0, stop=["Paris"]))
    )
    assert frames[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert "Paris" not in text and text.startswith("The capital of France is")
    # The gateway matched the stop: the worker is told the job is done, frees it and acknowledges it.
    client = redis.Redis.from_url(cluster.redis_url)
    requests = StreamKeys(cluster.namespace).requests("smollm2-135m-instruct")
    assert wait_for(lambda: client.xlen(requests) == 0)
    client.close()
    assert wait_for(
        lambda: all(s.num_running == 0 for s in worker_statuses(cluster.redis_url, cluster.namespace))
    )
    logs = [p.read_text(errors="replace") for p in cluster.log_dir.glob(f"worker-{cluster.namespace}-*.log")]
    assert any("job finished (stop): its gateway matched a stop string" in log for log in logs)


def test_logprobs_and_seeded_sampling(stub: inference_pb2_grpc.InferenceStub) -> None:
    request = build_request(
        "The weather today is", max_tokens=6, temperature=0.8, seed=42, logprobs=3, ignore_eos=True
    )
    _, first, frames = collect(stub.Generate(request))
    _, second, _ = collect(stub.Generate(request))
    assert first == second
    logprobs = [lp for f in frames for lp in f.logprobs]
    assert [lp.token_id for lp in logprobs] == first
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in logprobs)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (build_request("hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (build_request("hi", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        (inference_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input: set one of"),
        (build_request(token_ids=[1, 999999]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids[1]"),
        (build_request("word " * 2100), grpc.StatusCode.INVALID_ARGUMENT, "context of 2048 tokens"),
        (build_request("hi", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model: 'gpt-9'"),
        (
            build_request(messages=[{"role": "wizard", "content": "x"}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages[0].role",
        ),
    ],
)
def test_bad_requests_get_a_clear_status(
    stub: inference_pb2_grpc.InferenceStub,
    request_: inference_pb2.GenerateRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request_))
    assert error.value.code() == code
    assert message in error.value.details()


def test_prompt_too_long_names_both_numbers(stub: inference_pb2_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(build_request(token_ids=[100] * 3000)))
    assert "prompt: 3000 tokens" in error.value.details() and "2048" in error.value.details()


def test_tokenize_and_list_models(stub: inference_pb2_grpc.InferenceStub) -> None:
    reply = stub.Tokenize(
        inference_pb2.TokenizeRequest(
            chat=inference_pb2.Chat(messages=[inference_pb2.ChatMessage(role="user", content="Hi")])
        )
    )
    assert reply.token_ids[0] == 1 and reply.max_context == 2048
    models = stub.ListModels(inference_pb2.ListModelsRequest()).models
    assert [(m.id, m.num_workers, m.is_default, m.kind, m.max_context, m.dimension) for m in models] == [
        ("smollm2-135m-instruct", 1, True, inference_pb2.MODEL_KIND_GENERATE, 2048, 0),
        ("all-minilm-l6-v2", 1, True, inference_pb2.MODEL_KIND_EMBED, 256, 384),
    ]


def test_health_and_reflection(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "conveyor.v1.Inference"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"conveyor.v1.Inference", "grpc.health.v1.Health"} <= names


class BidiSession:
    """A GenerateStream call driven from a queue, with frames gathered per request id."""

    def __init__(self, stub: inference_pb2_grpc.InferenceStub):
        self._outgoing: queue.Queue[inference_pb2.ClientFrame | None] = queue.Queue()
        self.frames: dict[str, list[inference_pb2.ServerFrame]] = {}
        self.first_frame = {}  # request id -> threading.Event
        self._call = stub.GenerateStream(iter(self._outgoing.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, frame: inference_pb2.ClientFrame) -> None:
        self._outgoing.put(frame)

    def close(self, timeout_s: float = 120.0) -> None:
        self._outgoing.put(None)
        self._reader.join(timeout_s)
        assert not self._reader.is_alive(), "the stream did not end after the client half-closed"

    def _read(self) -> None:
        for frame in self._call:
            self.frames.setdefault(frame.request_id, []).append(frame)


def test_bidi_stream_multiplexes_requests_errors_and_a_mid_stream_cancel(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    prompts = {f"q{i}": f"Count from {i} to {i + 10}:" for i in range(5)}
    expected = {
        rid: collect(stub.Generate(build_request(p, max_tokens=12, temperature=0.0, ignore_eos=True)))[1]
        for rid, p in prompts.items()
    }
    session = BidiSession(stub)
    session.send(
        inference_pb2.ClientFrame(
            generate=build_request(
                "Tell me a very long story.",
                request_id="long",
                max_tokens=1500,
                temperature=0.0,
                ignore_eos=True,
            )
        )
    )
    for rid, prompt in prompts.items():
        session.send(
            inference_pb2.ClientFrame(
                generate=build_request(
                    prompt, request_id=rid, max_tokens=12, temperature=0.0, ignore_eos=True
                )
            )
        )
    session.send(inference_pb2.ClientFrame(generate=build_request("x", request_id="bad", temperature=-3.0)))
    session.send(inference_pb2.ClientFrame(generate=build_request("x", request_id="q0")))  # q0 is open
    assert wait_for(lambda: len(session.frames.get("long", [])) >= 3, timeout_s=60)
    session.send(inference_pb2.ClientFrame(cancel=inference_pb2.CancelRequest(request_id="long")))
    session.close()
    for rid, tokens in expected.items():
        responses = [f.response for f in session.frames[rid] if f.HasField("response")]
        got = [t for r in responses for t in r.token_ids]
        assert got == tokens, rid
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert session.frames["bad"][0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert any(f.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0] for f in session.frames["q0"])
    long_frames = session.frames["long"]
    assert long_frames[-1].response.finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert sum(len(f.response.token_ids) for f in long_frames) < 1500
    assert wait_for(
        lambda: all(s.num_running == 0 for s in worker_statuses(cluster.redis_url, cluster.namespace))
    )


def test_client_disconnect_cancels_the_job_on_the_worker(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    call = stub.Generate(
        build_request("Write an endless poem.", max_tokens=1500, temperature=0.0, ignore_eos=True)
    )
    next(call)
    next(call)
    assert wait_for(
        lambda: any(s.num_running == 1 for s in worker_statuses(cluster.redis_url, cluster.namespace))
    )
    call.cancel()
    assert wait_for(
        lambda: all(
            s.num_running == 0 and s.num_used_blocks == 0
            for s in worker_statuses(cluster.redis_url, cluster.namespace)
        )
    ), "the job is cancelled and its KV blocks are back in the pool"


def test_deadline_ends_the_call_and_the_job(stub: inference_pb2_grpc.InferenceStub, cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        list(
            stub.Generate(
                build_request("Write an endless poem.", max_tokens=1500, temperature=0.0, ignore_eos=True),
                timeout=3,
            )
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30
    assert wait_for(
        lambda: all(
            s.num_running == 0 and s.num_used_blocks == 0
            for s in worker_statuses(cluster.redis_url, cluster.namespace)
        )
    ), "the job is cancelled and its KV blocks freed"


def test_a_job_whose_deadline_passed_in_the_queue_is_never_started(cluster: Cluster) -> None:
    job = jobs_pb2.Job(
        request_id="late",
        gateway_id="late-gateway",
        prompt_token_ids=[1, 2, 3],
        sampling=jobs_pb2.Sampling(max_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0),
        deadline_unix_ms=int(time.time() * 1000) - 1,
    )
    chunk = answer_to(cluster, job)
    assert chunk.failure == jobs_pb2.JOB_FAILURE_DEADLINE
    assert "deadline passed while queued" in chunk.failure_message
    assert not chunk.token_ids, "it never ran: its only chunk carries no token"


def test_client_library_sync_and_async(cluster: Cluster) -> None:
    import asyncio

    with ConveyorClient(cluster.address) as client:
        sync = client.generate(messages=FRANCE, max_tokens=12, temperature=0.0)
        assert [m.id for m in client.list_models()] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]

    async def run() -> str:
        async with AsyncConveyorClient(cluster.address) as client:
            return (await client.generate(messages=FRANCE, max_tokens=12, temperature=0.0)).text

    assert "Paris" in sync.text and sync.finish_reason in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert asyncio.run(run()) == sync.text


def test_unreadable_job_goes_to_the_dead_stream_and_serving_goes_on(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    keys = StreamKeys(cluster.namespace)
    client = redis.Redis.from_url(cluster.redis_url)
    dead_before = client.xlen(keys.dead("smollm2-135m-instruct"))
    client.xadd(keys.requests("smollm2-135m-instruct"), {FIELD: b"\xff\xfe not a Job"})
    assert wait_for(lambda: client.xlen(keys.dead("smollm2-135m-instruct")) == dead_before + 1)
    ((_, fields),) = client.xrevrange(keys.dead("smollm2-135m-instruct"), count=1)
    assert fields[b"reason"].startswith(b"unreadable Job")
    assert wait_for(lambda: client.xlen(keys.requests("smollm2-135m-instruct")) == 0)
    text, _, _ = collect(stub.Generate(build_request(messages=FRANCE, max_tokens=12, temperature=0.0)))
    assert "Paris" in text
    client.close()


def test_worker_refuses_a_job_it_cannot_run_in_band_and_acknowledges_it(cluster: Cluster) -> None:
    job = jobs_pb2.Job(
        request_id="too-long",
        gateway_id="probe",
        prompt_token_ids=[100] * 2048,  # the worker's context is 2048: nothing left to generate
        sampling=jobs_pb2.Sampling(
            max_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0, logprobs=-1
        ),
    )
    chunk = answer_to(cluster, job)
    assert chunk.finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert chunk.failure == jobs_pb2.JOB_FAILURE_INVALID and "context limit of 2048" in chunk.failure_message


def test_a_job_that_would_crash_the_model_is_buried_and_its_gateway_told(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    keys = StreamKeys(cluster.namespace)
    client = redis.Redis.from_url(cluster.redis_url)
    dead_before = client.xlen(keys.dead("smollm2-135m-instruct"))
    job = jobs_pb2.Job(
        request_id="crasher",
        gateway_id="crash-probe",
        prompt_token_ids=[1, 999_999],
        sampling=jobs_pb2.Sampling(max_tokens=4, temperature=float("nan"), top_p=1.0, repetition_penalty=1.0),
    )
    chunk = answer_to(cluster, job)
    assert chunk.failure == jobs_pb2.JOB_FAILURE_INVALID
    assert "token id 999999 outside the vocabulary" in chunk.failure_message
    assert client.xlen(keys.dead("smollm2-135m-instruct")) == dead_before + 1
    assert client.xrevrange(keys.dead("smollm2-135m-instruct"), count=1)[0][1][b"reason"].startswith(
        b"token id 999999"
    )
    client.close()
    text, _, _ = collect(stub.Generate(build_request(messages=FRANCE, max_tokens=12, temperature=0.0)))
    assert "Paris" in text, "the worker still serves"


def answer_to(cluster: Cluster, job: jobs_pb2.Job) -> jobs_pb2.TokenChunk:
    """Queue a job straight onto the stream, as a gateway would, and return the one chunk its gateway
    stream gets; the job is acknowledged by then."""
    keys = StreamKeys(cluster.namespace)
    client = redis.Redis.from_url(cluster.redis_url)
    client.xadd(keys.requests("smollm2-135m-instruct"), {FIELD: job.SerializeToString()})
    assert wait_for(lambda: client.xlen(keys.responses("smollm2-135m-instruct", job.gateway_id)) > 0)
    ((_, fields),) = client.xrange(keys.responses("smollm2-135m-instruct", job.gateway_id))
    (chunk,) = jobs_pb2.TokenBatch.FromString(fields[FIELD]).chunks
    assert wait_for(lambda: client.xlen(keys.requests("smollm2-135m-instruct")) == 0)
    client.close()
    return chunk
