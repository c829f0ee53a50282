"""Random and boundary requests at a live gateway: each ends in a response or a clear status.

Hypothesis builds batches of GenerateRequests — most broken somewhere, some valid — and sends each
batch concurrently with a short deadline. Afterwards both processes still serve and the worker holds
no KV block.
"""

import asyncio

import grpc
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import inference_pb2, inference_pb2_grpc
from protos.redis_layout import StreamKeys
from tests.e2e.cluster import wait_for, wait_until_serving, worker_statuses
from tests.e2e.conftest import Cluster

VOCAB = 49152
CONTEXT = 2048
# What a refused request may be told; INTERNAL or UNKNOWN would be a bug.
CLEAR_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
u32 = st.one_of(
    st.integers(0, 8), st.sampled_from([VOCAB - 1, VOCAB, CONTEXT - 1, CONTEXT, 2**31, 2**32 - 1])
)
floats = st.one_of(
    st.none(),
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1.0, 2.0, 100.0, 100.5, float("inf"), float("nan")]),
)
token_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), u32), max_size=40)


@st.composite
def wild_sampling(draw: st.DrawFn) -> inference_pb2.SamplingParams:
    params = inference_pb2.SamplingParams(
        max_tokens=draw(st.one_of(st.integers(0, 6), u32)),
        top_k=draw(u32),
        min_p=draw(floats) or 0.0,
        presence_penalty=draw(floats) or 0.0,
        frequency_penalty=draw(floats) or 0.0,
        stop=draw(st.lists(texts, max_size=3)),
        stop_token_ids=draw(st.lists(u32, max_size=3)),
        ignore_eos=draw(st.booleans()),
        min_tokens=draw(st.one_of(st.integers(0, 3), u32)),
    )
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = draw(floats)
        if value is not None:
            setattr(params, name, value)
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        params.seed = seed
    logprobs = draw(st.one_of(st.none(), u32))
    if logprobs is not None:
        params.logprobs = logprobs
    return params


@st.composite
def sane_sampling(draw: st.DrawFn) -> inference_pb2.SamplingParams:
    """Valid values, at and near their boundaries, that finish within a few tokens."""
    params = inference_pb2.SamplingParams(
        max_tokens=draw(st.integers(1, 4)),
        top_k=draw(st.sampled_from([0, 1, 50, VOCAB])),
        min_p=draw(st.sampled_from([0.0, 0.05, 1.0])),
        presence_penalty=draw(st.sampled_from([0.0, -2.0, 2.0])),
        frequency_penalty=draw(st.sampled_from([0.0, -2.0, 2.0])),
        stop=draw(st.lists(st.text(min_size=1, max_size=4), max_size=2)),
        stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=2)),
        ignore_eos=draw(st.booleans()),
        min_tokens=draw(st.integers(0, 1)),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 2.0])),
        top_p=draw(st.sampled_from([1e-6, 0.9, 1.0])),
        repetition_penalty=draw(st.sampled_from([0.5, 1.0, 1.3])),
    )
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        params.logprobs = draw(st.integers(0, 20))
    return params


@st.composite
def generate_requests(draw: st.DrawFn) -> inference_pb2.GenerateRequest:
    """Half well-formed (each field valid, often at a boundary), half anything at all."""
    sane = draw(st.booleans())
    request = inference_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), texts, st.just("x" * 256), st.just("x" * 257))),
        model=draw(st.sampled_from(["", "smollm2-135m-instruct"] + ([] if sane else ["no-such-model"]))),
        sampling=draw(sane_sampling() if sane else wild_sampling()),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
    )
    kind = draw(st.sampled_from(["prompt", "chat", "token_ids"] + ([] if sane else ["none"])))
    if kind == "prompt":
        request.prompt = draw(st.text(min_size=1, max_size=80) if sane else texts)
    elif kind == "chat":
        roles = st.sampled_from(["system", "user", "assistant", "tool"])
        for _ in range(draw(st.integers(1 if sane else 0, 3))):
            request.chat.messages.add(
                role=draw(roles if sane else st.one_of(roles, texts)), content=draw(texts)
            )
    elif kind == "token_ids":
        ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40) if sane else token_ids
        request.token_ids.ids.extend(draw(ids))
    return request


async def call(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest) -> str:
    try:
        frames = [frame async for frame in stub.Generate(request, timeout=3)]
    except grpc.aio.AioRpcError as error:
        assert error.code() in CLEAR_STATUSES, (error.code(), error.details(), request)
        assert error.details(), request
        return error.code().name
    assert frames and frames[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED, request
    return "OK"


async def send_batch(address: str, batch: list[inference_pb2.GenerateRequest]) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await asyncio.gather(*(call(stub, request) for request in batch))


def test_fuzzed_requests_get_an_answer_or_a_clear_status(cluster: Cluster) -> None:
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(generate_requests(), min_size=7, max_size=14))
    def run(batch: list[inference_pb2.GenerateRequest]) -> None:
        for outcome in asyncio.run(send_batch(cluster.address, batch)):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    run()
    print(f"\nfuzz: {sum(outcomes.values())} requests, outcomes {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) >= 600 and outcomes.get("OK", 0) >= 180
    client = redis.Redis.from_url(cluster.redis_url)
    dead = [
        f[b"reason"] for _, f in client.xrange(StreamKeys(cluster.namespace).dead("smollm2-135m-instruct"))
    ]
    client.close()
    assert not dead, f"the gateway let through jobs a worker refused: {dead[:5]}"
    wait_until_serving(cluster.address, [])
    assert wait_for(
        lambda: all(
            s.num_running == 0 and s.num_waiting == 0 and s.num_used_blocks == 0
            for s in worker_statuses(cluster.redis_url, cluster.namespace)
        ),
        timeout_s=30,
    ), "every KV block back in the pool"
