"""One trace per request across the gateway and the worker, joined to the caller's trace."""

from client.library import build_request
from protos import inference_pb2_grpc
from tests.e2e.cluster import wait_for
from tests.e2e.conftest import Cluster

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def test_a_request_is_one_trace_across_gateway_and_worker(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    metadata = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
    frames = list(
        stub.Generate(build_request("Hi", max_tokens=4, temperature=0.0, ignore_eos=True), metadata=metadata)
    )
    assert sum(len(f.token_ids) for f in frames) == 4
    expected = {
        ("conveyor-gateway", "conveyor.generate"),
        ("conveyor-gateway", "validate"),
        ("conveyor-gateway", "tokenize"),
        ("conveyor-gateway", "queue"),
        ("conveyor-gateway", "stream"),
        ("conveyor-worker", "worker.queue"),
        ("conveyor-worker", "worker.prefill"),
        ("conveyor-worker", "worker.decode"),
    }
    # Both processes batch their spans and send them every few seconds.
    assert wait_for(
        lambda: expected <= {(s.service, s.name) for s in cluster.collector.spans(CALLER_TRACE)}, timeout_s=30
    ), cluster.collector.spans(CALLER_TRACE)
    spans = cluster.collector.spans(CALLER_TRACE)
    (root,) = [s for s in spans if s.name == "conveyor.generate"]
    assert root.parent_span_id == CALLER_SPAN, "the gateway's span is a child of the caller's"
    assert all(s.parent_span_id == root.span_id for s in spans if s is not root), "the rest hang off it"


def test_log_lines_about_a_request_carry_its_request_and_trace_ids(
    stub: inference_pb2_grpc.InferenceStub, cluster: Cluster
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    metadata = (("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),)
    request = build_request("Hi", max_tokens=3, temperature=0.0, ignore_eos=True)
    request.request_id = "my-logged-request"
    assert len(list(stub.Generate(request, metadata=metadata))) >= 1

    def lines(process: str) -> list[str]:
        return [
            line
            for path in cluster.log_dir.glob(f"{process}-{cluster.namespace}-*.log")
            for line in path.read_text(errors="replace").splitlines()
            if f"trace_id={trace_id}" in line
        ]

    assert wait_for(lambda: lines("gateway") and lines("worker"), timeout_s=10)
    (gateway_line,) = lines("gateway")
    (worker_line,) = lines("worker")
    assert "generation finished" in gateway_line and "client's id my-logged-request" in gateway_line
    assert "job finished (length): 3 tokens" in worker_line
    request_id = worker_line.split("request_id=")[1].split()[0]
    assert f"request_id={request_id}" in gateway_line, "the same job id on both sides"
