"""The call deploy/README.md ends with: its grpcurl payload, sent as is to a live gateway."""

import re
from pathlib import Path

from google.protobuf import json_format

from protos import inference_pb2, inference_pb2_grpc

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def test_the_readme_grpcurl_call_streams_a_completion(stub: inference_pb2_grpc.InferenceStub) -> None:
    text = README.read_text()
    (method,) = set(re.findall(r"localhost:50051 (conveyor\.v1\.\w+/\w+) <<'EOF'", text))
    service, name = method.rsplit("/", 1)
    assert service == inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name and name == "Generate"
    (payload,) = re.findall(r"<<'EOF'\n(.*?)\nEOF", text, re.DOTALL)
    request = json_format.Parse(payload, inference_pb2.GenerateRequest())
    frames = list(stub.Generate(request, timeout=120))
    assert frames[-1].finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert "".join(f.text for f in frames).strip()
    assert frames[-1].usage.completion_tokens <= request.sampling.max_tokens
