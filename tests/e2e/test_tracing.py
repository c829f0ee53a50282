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
