"""n completions through the real gateway, Redis and worker: seeded n = 4 gives the same four
completions twice, usage counts the prompt once, a stop string ends only its choice, a cancel ends
every choice, and `conveyor generate -n` prints each."""

import grpc
import pytest
import redis

from client.library import ConveyorClient, build_request
from protos import inference_pb2
from protos.redis_layout import StreamKeys
from tests.e2e.cluster import conveyor_generate, wait_for
from tests.e2e.conftest import Cluster
from tests.e2e.test_serving import BidiSession

MODEL = "smollm2-135m-instruct"
STORY = [{"role": "user", "content": "Tell me a one-line story about a cat."}]


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> ConveyorClient:
    return ConveyorClient(cluster.address)


def test_seeded_n_gives_the_same_completions_twice_and_counts_the_prompt_once(client: ConveyorClient) -> None:
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 1234, "n": 4}
    first = client.generate(messages=STORY, **params)
    again = client.generate(messages=STORY, **params)
    assert len(first.choices) == 4
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in first.choices]
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) > 1, "each choice samples its own stream"
    solo = client.generate(messages=STORY, **{**params, "n": 1})
    assert solo.token_ids == first.choices[0].token_ids, "choice 0 is the request with n = 1"
    frames = list(client.stream(messages=STORY, **params))
    assert [f for f in frames if f.HasField("usage")] == [frames[-1]], "usage on the last frame only"
    assert frames[-1].usage.prompt_tokens == first.prompt_tokens == solo.prompt_tokens
    assert frames[-1].usage.completion_tokens == sum(len(c.token_ids) for c in first.choices)
    for choice in range(4):
        mine = [f for f in frames if f.choice_index == choice]
        assert [f.index for f in mine] == [sum(len(g.token_ids) for g in mine[:i]) for i in range(len(mine))]
        assert sum(1 for f in mine if f.finish_reason) == 1 and mine[-1].finish_reason


def test_a_stop_string_ends_only_the_choice_it_matched_in(client: ConveyorClient, cluster: Cluster) -> None:
    completion = client.generate(
        "Count from 1 to 30 in digits: 1, 2, 3,", max_tokens=60, temperature=1.0, seed=5, n=3, stop=["1"]
    )
    for choice in completion.choices:
        assert "1" not in choice.text
        assert choice.finish_reason in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert any(c.finish_reason == "FINISH_REASON_STOP" and len(c.token_ids) < 60 for c in completion.choices)
    keys = StreamKeys(cluster.namespace)
    redis_client = redis.Redis.from_url(cluster.redis_url)
    assert wait_for(lambda: redis_client.xlen(keys.requests(MODEL)) == 0), "the job ended on the worker"
    assert not list(redis_client.scan_iter(match=keys.progress(MODEL, "*")))
    redis_client.close()


def test_a_cancel_ends_every_choice(client: ConveyorClient, cluster: Cluster) -> None:
    session = BidiSession(client.stub)
    request = build_request(
        "Tell me a very long story.",
        request_id="many",
        max_tokens=1500,
        temperature=1.0,
        ignore_eos=True,
        n=3,
    )
    session.send(inference_pb2.ClientFrame(generate=request))
    assert wait_for(lambda: len(session.frames.get("many", [])) >= 6, timeout_s=60)
    session.send(inference_pb2.ClientFrame(cancel=inference_pb2.CancelRequest(request_id="many")))
    session.close()
    ends = [f.response for f in session.frames["many"] if f.response.finish_reason]
    assert sorted(f.choice_index for f in ends) == [0, 1, 2]
    assert all(f.finish_reason == inference_pb2.FINISH_REASON_CANCELLED for f in ends)
    keys = StreamKeys(cluster.namespace)
    redis_client = redis.Redis.from_url(cluster.redis_url)
    assert wait_for(lambda: redis_client.xlen(keys.requests(MODEL)) == 0), (
        "the job was cancelled on the worker"
    )
    redis_client.close()


def test_n_out_of_range_is_invalid_argument_naming_the_field(client: ConveyorClient) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("Hi", max_tokens=4, n=17)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.n: at most 16 completions, got 17" in (refused.value.details() or "")


def test_conveyor_generate_prints_each_of_n_completions(cluster: Cluster) -> None:
    stdout = conveyor_generate(
        cluster.address,
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--max-tokens",
        "12",
        "-n",
        "3",
        "Name a fruit.",
    )
    assert [line for line in stdout.splitlines() if line.startswith("--- choice")] == [
        "--- choice 0 ---",
        "--- choice 1 ---",
        "--- choice 2 ---",
    ], stdout
