"""Embeddings through the gateway, Redis and a real embeddings worker, beside the generation worker:
vectors equal transformers' with the model's own pooling, whole and in order when a call's inputs
are split across batches; routing by model kind; every bad input a clear status."""

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from client.library import ConveyorClient, build_request, vectors_of
from protos import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import Cluster
from tests.embedding_reference import TEXTS, reference_vectors

EMBEDDER = "all-minilm-l6-v2"
GENERATOR = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def reference(embedder_dir: Path) -> list[torch.Tensor]:
    return reference_vectors(embedder_dir, TEXTS)


def cosines(response: inference_pb2.EmbedResponse, expected: list[torch.Tensor]) -> list[float]:
    got = torch.tensor(vectors_of(response))
    return [
        float(torch.nn.functional.cosine_similarity(g, e, dim=0)) for g, e in zip(got, expected, strict=True)
    ]


def test_a_call_split_across_batches_comes_back_whole_in_order_and_equal_to_transformers(
    stub: inference_pb2_grpc.InferenceStub, reference: list[torch.Tensor], embedder_dir: Path
) -> None:
    # The worker batches at most 4 inputs: these 10 texts of mixed length take several batches.
    response = stub.Embed(inference_pb2.EmbedRequest(inputs=TEXTS, request_id="mine"), timeout=120)
    assert response.request_id == "mine" and response.model == EMBEDDER
    assert len(response.embeddings) == len(TEXTS)
    assert all(len(e.values) == 384 for e in response.embeddings)
    assert min(cosines(response, reference)) > 0.9999
    assert all(abs(float(torch.tensor(v).norm()) - 1) < 1e-4 for v in vectors_of(response))
    tokenizer = AutoTokenizer.from_pretrained(str(embedder_dir))
    assert response.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert response.timings.total_s >= response.timings.queued_s >= 0


def test_concurrent_calls_batched_together_each_get_their_own_vectors(
    cluster: Cluster, reference: list[torch.Tensor]
) -> None:
    import asyncio

    from client.library import AsyncConveyorClient

    async def run() -> list[inference_pb2.EmbedResponse]:
        async with AsyncConveyorClient(cluster.address) as client:
            return await asyncio.gather(*(client.embed([text], model=EMBEDDER) for text in TEXTS))

    for response, expected in zip(asyncio.run(run()), reference, strict=True):
        assert cosines(response, [expected])[0] > 0.9999


def test_normalize_false_gives_the_raw_pooled_vector(
    stub: inference_pb2_grpc.InferenceStub, reference: list[torch.Tensor]
) -> None:
    raw = stub.Embed(inference_pb2.EmbedRequest(inputs=TEXTS[:3], normalize=False), timeout=60)
    norms = [float(torch.tensor(v).norm()) for v in vectors_of(raw)]
    assert all(norm > 1.5 for norm in norms), norms  # MiniLM's mean-pooled vectors are longer than 1
    assert min(cosines(raw, reference[:3])) > 0.9999


def test_an_input_over_the_limit_is_refused_with_the_numbers_or_truncated(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    long_text = "word " * 400
    with pytest.raises(grpc.RpcError) as error:
        stub.Embed(inference_pb2.EmbedRequest(inputs=["short", long_text]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("inputs[1]: 402 tokens exceed the model's limit of 256")
    cut = stub.Embed(inference_pb2.EmbedRequest(inputs=["short", long_text], truncate=True), timeout=60)
    assert len(cut.embeddings) == 2 and cut.usage.prompt_tokens == 3 + 256


@pytest.mark.parametrize(
    ("request_fields", "code", "message"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "inputs: must hold at least one text"),
        ({"inputs": ["a", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]: must not be empty"),
        ({"inputs": ["a"] * 2049}, grpc.StatusCode.INVALID_ARGUMENT, "inputs: at most 2048 texts per call"),
        (
            {"inputs": ["a"], "model": GENERATOR},
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model: '{GENERATOR}' is a generation model: call Generate or GenerateStream",
        ),
        ({"inputs": ["a"], "model": "nope"}, grpc.StatusCode.NOT_FOUND, "model: 'nope' is not served here"),
    ],
)
def test_bad_embed_requests_get_a_clear_status(
    stub: inference_pb2_grpc.InferenceStub,
    request_fields: dict[str, object],
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Embed(inference_pb2.EmbedRequest(**request_fields), timeout=30)  # type: ignore[arg-type]
    assert error.value.code() == code and error.value.details().startswith(message)


def test_generate_on_the_embedding_model_is_refused(stub: inference_pb2_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(build_request("Hi", model=EMBEDDER, max_tokens=4), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == f"model: '{EMBEDDER}' is an embedding model: call Embed"


def test_generation_still_goes_to_the_generator(cluster: Cluster) -> None:
    with ConveyorClient(cluster.address) as client:
        completion = client.generate(
            "Say hi.", model=GENERATOR, max_tokens=4, temperature=0.0, ignore_eos=True
        )
    assert len(completion.token_ids) == 4


def test_the_cli_prints_vectors_and_similarities(cluster: Cluster) -> None:
    def conveyor(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "client", "embed", "--address", cluster.address, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return result.stdout

    lines = conveyor("A man is eating food.", "The girl is carrying a baby.").splitlines()
    assert len(lines) == 2 and all(len(line.strip("[]").split(",")) == 384 for line in lines)
    table = conveyor("--similarity", *TEXTS[5:8]).splitlines()
    matrix = [[float(value) for value in row.split()[-3:]] for row in table[1:]]
    assert len(matrix) == 3 and all(matrix[i][i] == 1.0 for i in range(3))
    assert matrix[0][1] == matrix[1][0] > 0.7 > 0.1 > matrix[0][2], table


def test_bench_embed_against_a_live_gateway_reports_both_rows_and_their_agreement(
    cluster: Cluster, tmp_path: Path
) -> None:
    report = tmp_path / "embed.json"
    args = ["--address", cluster.address, "--num-texts", "24", "--concurrency", "8"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "bench",
            "--embed",
            *args,
            "--baseline-requests",
            "8",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(report.read_text())
    ours, baseline = figures["rows"]
    assert ours["texts"] == 24 and baseline["texts"] == 8
    assert ours["embeddings_per_s"] > 0 and baseline["embeddings_per_s"] > 0
    assert set(ours["latency_ms"]) == {"p50", "p90", "p99"}
    assert figures["min_cosine"] > 0.9999
