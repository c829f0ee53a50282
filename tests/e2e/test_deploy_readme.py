"""The calls deploy/README.md ends with: their grpcurl payloads, sent as is to a live gateway."""

import json
import re
from pathlib import Path

import httpx2 as httpx
from google.protobuf import json_format

from protos import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import Cluster

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def readme_calls() -> dict[str, str]:
    """Each `grpcurl ... conveyor.v1.Inference/<Method> <<'EOF'` call: method name -> JSON payload."""
    text = README.read_text()
    calls = re.findall(r"localhost:50051 (conveyor\.v1\.\w+)/(\w+) <<'EOF'\n(.*?)\nEOF", text, re.DOTALL)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    assert calls and all(found == service for found, _, _ in calls)
    return {name: payload for _, name, payload in calls}


def test_the_readme_grpcurl_calls_stream_a_completion_and_embed(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    calls = readme_calls()
    assert set(calls) == {"Generate", "Embed"}
    request = json_format.Parse(calls["Generate"], inference_pb2.GenerateRequest())
    frames = list(stub.Generate(request, timeout=120))
    assert frames[-1].finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert "".join(f.text for f in frames).strip()
    assert frames[-1].usage.completion_tokens <= request.sampling.max_tokens
    embed = json_format.Parse(calls["Embed"], inference_pb2.EmbedRequest())
    response = stub.Embed(embed, timeout=60)
    assert [len(e.values) for e in response.embeddings] == [384] * len(embed.inputs)


def test_the_readme_curl_calls_answer_over_the_openai_front(cluster: Cluster) -> None:
    """Every `curl ... -d '{...}'` of both READMEs, sent as is to the gateway's HTTP port."""
    calls = [
        (path, json.loads(payload))
        for readme in (README, README.parents[1] / "README.md")
        for path, payload in re.findall(
            r"curl -sN? \S+?:8000(/v1/[\w/]+) (?:-H '[^']*' ?\\?\s*)*-d '(\{.*?\})'",
            readme.read_text(),
            re.DOTALL,
        )
    ]
    assert {path for path, _ in calls} == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    for path, body in calls:
        reply = httpx.post(f"{cluster.http_url}{path}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        if not body.get("stream"):
            assert reply.json()["object"] in ("chat.completion", "text_completion", "list")
