"""API keys and mutual TLS on the gateway; an ACL user over TLS to Redis for gateway and worker."""

import ssl
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.library import ConveyorClient, Security
from client.redis_server import RedisServer, free_port
from protos import inference_pb2
from tests.e2e.certificates import Pki, make_pki
from tests.e2e.cluster import start_gateway, start_worker, stop_process, wait_for, wait_until_serving
from tests.e2e.conftest import Cluster
from tests.e2e.tls_proxy import TlsProxy

ALICE_KEY = "sk-alice-4f1c9a"
BOB_KEY = "sk-bob-77e0d2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def health_over(channel: grpc.Channel) -> int:
    try:
        request = health_pb2.HealthCheckRequest(service="conveyor.v1.Inference")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError:
        return -1


def refusal(security: Security, address: str) -> grpc.RpcError:
    with ConveyorClient(address, security=security) as client, pytest.raises(grpc.RpcError) as error:
        client.generate("Hi", max_tokens=2, timeout_s=20)
    return error.value


def test_api_keys_and_mutual_tls(cluster: Cluster, pki: Pki, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# who may call\nalice:{ALICE_KEY}\nbob:{BOB_KEY}:some-other-model\n")
    gateway, address = start_gateway(
        cluster.redis_url,
        cluster.namespace,
        cluster.model_dir,
        cluster.log_dir,
        "--api-keys-file",
        str(keys_file),
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--tls-client-ca-file",
        str(pki.ca),
        "--http-port",
        str(http_port := free_port()),
    )
    port = address.rsplit(":", 1)[1]
    mutual = Security(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    try:
        credentials = mutual.channel_credentials()
        assert credentials is not None
        with grpc.secure_channel(address, credentials) as channel:
            # Health needs no key, so probes work; it still needs the client certificate.
            assert wait_for(lambda: health_over(channel) == health_pb2.HealthCheckResponse.SERVING, 120)
        alice = Security(ALICE_KEY, pki.ca, pki.client_cert, pki.client_key)
        with ConveyorClient(address, security=alice) as client:
            completion = client.generate("Say hi.", max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(completion.token_ids) == 4
            assert [m.id for m in client.list_models()] == ["smollm2-135m-instruct"]
        bob = Security(BOB_KEY, pki.ca, pki.client_cert, pki.client_key)
        with ConveyorClient(address, security=bob) as client:
            assert client.list_models() == []
        missing = refusal(mutual, address)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in missing.details()
        wrong = refusal(Security("sk-nobody", pki.ca, pki.client_cert, pki.client_key), address)
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and wrong.details() == "invalid API key"
        denied = refusal(bob, address)
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "'bob'" in denied.details()
        with ConveyorClient(address, security=mutual) as client, pytest.raises(grpc.RpcError) as stream_error:
            frames = iter([inference_pb2.ClientFrame(generate=inference_pb2.GenerateRequest(prompt="Hi"))])
            list(client.stub.GenerateStream(frames, timeout=20))
        assert stream_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # No client certificate, one from another CA, or plaintext: the handshake fails.
        for stranger in (
            Security(ALICE_KEY, pki.ca),
            Security(ALICE_KEY, pki.ca, pki.stranger_cert, pki.stranger_key),
        ):
            assert refusal(stranger, address).code() == grpc.StatusCode.UNAVAILABLE
        assert refusal(Security(ALICE_KEY), address).code() == grpc.StatusCode.UNAVAILABLE
        check_the_openai_front(pki, f"https://127.0.0.1:{http_port}/v1")
    finally:
        assert stop_process(gateway) == 0
    log = (cluster.log_dir / f"gateway-{cluster.namespace}-{port}.log").read_text()
    assert "mutual TLS" in log and "2 API keys" in log
    assert ALICE_KEY not in log and BOB_KEY not in log, "API keys must never be logged"


def check_the_openai_front(pki: Pki, base_url: str) -> None:
    """The same keys and the same mutual TLS over HTTP, with OpenAI's statuses."""
    tls = ssl.create_default_context(cafile=str(pki.ca))
    tls.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    http = httpx.Client(verify=tls, timeout=30)
    alice = openai.OpenAI(base_url=base_url, api_key=ALICE_KEY, max_retries=0, http_client=http)
    reply = alice.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert reply.choices[0].message.content
    body = {"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2}
    for headers, status, kind in (
        ({}, 401, "authentication_error"),
        ({"authorization": "Bearer sk-nobody"}, 401, "authentication_error"),
        ({"authorization": f"Bearer {BOB_KEY}"}, 403, "permission_error"),
    ):
        refused = http.post(f"{base_url}/completions", json=body, headers=headers)
        assert (refused.status_code, refused.json()["error"]["type"]) == (status, kind), refused.text
    bob = http.get(f"{base_url}/models", headers={"authorization": f"Bearer {BOB_KEY}"})
    assert bob.json()["data"] == []
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(f"{base_url}/models", verify=ssl.create_default_context(cafile=str(pki.ca)))


def test_gateway_and_worker_reach_redis_as_an_acl_user_over_tls(
    model_dir: Path, log_dir: Path, pki: Pki
) -> None:
    acl = ("--user", "default", "off", "--user", "conveyor", "on", ">s3cret-pw", "~*", "&*", "+@all")
    with (
        RedisServer(extra_args=acl) as redis_server,
        TlsProxy(redis_server.port, pki.server_cert, pki.server_key) as proxy,
    ):
        url = f"rediss://conveyor:s3cret-pw@localhost:{proxy.port}/0"
        worker = start_worker(url, "secure", model_dir, log_dir, "--redis-ca-file", str(pki.ca))
        gateway, address = start_gateway(url, "secure", model_dir, log_dir, "--redis-ca-file", str(pki.ca))
        try:
            wait_until_serving(address, [worker, gateway])
            with ConveyorClient(address) as client:
                completion = client.generate("Say hi.", max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(completion.token_ids) == 4
        finally:
            assert stop_process(gateway) == 0
            assert stop_process(worker) == 0
        # The same Redis refuses a wrong password; the gateway stays up, NOT_SERVING.
        wrong = f"rediss://conveyor:wrong@localhost:{proxy.port}/0"
        gateway, address = start_gateway(wrong, "secure", model_dir, log_dir, "--redis-ca-file", str(pki.ca))
        try:
            with grpc.insecure_channel(address) as channel:
                assert wait_for(
                    lambda: health_over(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=60
                )
        finally:
            assert stop_process(gateway) == 0
