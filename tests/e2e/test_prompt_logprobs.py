"""Prompt logprobs over gRPC: on the first frame only, one per prompt token from the second."""

import grpc
import pytest

from client.library import ConveyorClient
from protos import inference_pb2
from tests.e2e.conftest import Cluster


def test_the_first_frame_carries_the_prompt_logprobs(cluster: Cluster) -> None:
    with ConveyorClient(cluster.address) as client:
        prompt = client.stub.Tokenize(
            inference_pb2.TokenizeRequest(prompt="One two three four five")
        ).token_ids
        frames = list(
            client.stream(
                token_ids=list(prompt), max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2
            )
        )
    assert [t.token_id for t in frames[0].prompt_logprobs] == list(prompt)[1:]
    assert all(len(t.top) == 2 and t.logprob <= 0 for t in frames[0].prompt_logprobs)
    assert all(not frame.prompt_logprobs for frame in frames[1:])


def test_more_than_twenty_is_refused(cluster: Cluster) -> None:
    with ConveyorClient(cluster.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate("Hi", max_tokens=2, prompt_logprobs=21)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.prompt_logprobs: at most 20" in (refused.value.details() or "")
