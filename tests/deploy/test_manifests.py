"""deploy/: every overlay renders with `kubectl kustomize` and passes schema validation
(kubernetes-validate for Kubernetes' kinds, tests/deploy/keda_schemas.py for KEDA's), and the
manifests agree with the code: settings names, probe services and ports, the stream KEDA watches."""

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from checkpoints import model_id
from gateway.settings import GatewaySettings
from protos.redis_layout import GROUP, StreamKeys
from telemetry.probes import LIVENESS, READINESS
from tests.deploy.keda_schemas import SCHEMAS
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
Doc = dict[str, Any]


def render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/kubernetes"
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(request.param)


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(docs: list[Doc], kind: str, name: str) -> Doc:
    (first, *_) = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return first  # type: ignore[no-any-return]


def env_of(spec: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in spec.get("env", [])}


def test_every_resource_passes_its_schema(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    assert len(docs) >= 15
    for doc in docs:
        schema = SCHEMAS.get(doc["kind"])
        if schema is not None:
            jsonschema.Draft202012Validator(schema).validate(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_wrong_field_is_caught_by_the_validation() -> None:
    docs = render("cpu")
    gateway = one(docs, "Deployment", "conveyor-gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["servce"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES_VERSION, strict=True)
    scaled = one(docs, "ScaledObject", "conveyor-worker")
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 16
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMAS["ScaledObject"]).validate(scaled)


def test_pods_run_as_non_root_with_requests_and_limits(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in workloads} == {
        "conveyor-gateway",
        "conveyor-worker",
        "conveyor-embedder",
        "conveyor-redis",
    }
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for spec in pod["containers"]:
            assert spec["securityContext"]["allowPrivilegeEscalation"] is False
            assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(spec["resources"][bound]), (
                    workload["metadata"]["name"],
                    bound,
                )


def test_only_the_gpu_overlay_asks_for_a_gpu(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    worker = container(docs, "Deployment", "conveyor-worker")
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if overlay == "gpu" else None)
    assert env_of(worker)["CONVEYOR_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")


def test_settings_named_in_the_manifests_exist(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    for name, settings in (
        ("conveyor-gateway", GatewaySettings),
        ("conveyor-worker", WorkerSettings),
        ("conveyor-embedder", WorkerSettings),
    ):
        for variable in env_of(container(docs, "Deployment", name)):
            if variable.startswith("CONVEYOR_"):
                assert variable.removeprefix("CONVEYOR_").lower() in settings.model_fields, (name, variable)


def test_probes_ask_the_services_the_processes_serve(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    gateway = container(docs, "Deployment", "conveyor-gateway")
    worker = container(docs, "Deployment", "conveyor-worker")
    for spec, port in ((gateway, 50051), (worker, int(env_of(worker)["CONVEYOR_HEALTH_PORT"]))):
        assert port in {p["containerPort"] for p in spec["ports"]}
        for probe, service in (
            ("startupProbe", LIVENESS),
            ("livenessProbe", LIVENESS),
            ("readinessProbe", READINESS),
        ):
            assert spec[probe]["grpc"] == {"port": port, "service": service}, (spec["name"], probe)
    assert env_of(worker)["CONVEYOR_HEALTH_HOST"] == "0.0.0.0"


def test_workers_get_time_to_drain(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    pod = one(docs, "Deployment", "conveyor-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(
        env_of(pod["containers"][0])["CONVEYOR_DRAIN_TIMEOUT_S"]
    )
    assert "replicas" not in one(docs, "Deployment", "conveyor-worker")["spec"], "KEDA owns the count"


def test_keda_scales_workers_on_the_stream_they_read(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    worker_env = env_of(container(docs, "Deployment", "conveyor-worker"))
    namespace = one(docs, "Deployment", "conveyor-worker")["metadata"]["namespace"]
    scaled = one(docs, "ScaledObject", "conveyor-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "conveyor-worker"
    assert scaled["minReplicaCount"] == 0
    stream = StreamKeys(worker_env["CONVEYOR_NAMESPACE"]).requests("smollm2-135m-instruct")
    by_signal = {}
    for trigger in scaled["triggers"]:
        metadata = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert metadata["stream"] == stream and metadata["consumerGroup"] == GROUP
        assert metadata["address"] == f"conveyor-redis.{namespace}.svc.cluster.local:6379"
        assert trigger["authenticationRef"]["name"] == "conveyor-redis"
        by_signal[next(k for k in ("lagCount", "pendingEntriesCount") if k in metadata)] = metadata
    assert set(by_signal) == {"lagCount", "pendingEntriesCount"}
    assert by_signal["lagCount"]["activationLagCount"] == "0"
    auth = one(docs, "TriggerAuthentication", "conveyor-redis")["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "password", "name": "conveyor-redis", "key": "password"}]


def test_the_gateway_routes_embeddings_to_the_embedder_that_keda_scales(
    rendered: tuple[str, list[Doc]],
) -> None:
    overlay, docs = rendered
    gateway = env_of(container(docs, "Deployment", "conveyor-gateway"))
    embedder = env_of(container(docs, "Deployment", "conveyor-embedder"))
    extra_models = [Path(p) for p in json.loads(gateway["CONVEYOR_EXTRA_MODELS"])]
    assert extra_models == [Path(embedder["CONVEYOR_MODEL"])]
    assert embedder["CONVEYOR_DEVICE"] == "cpu", f"no GPU for the encoder, even in the {overlay} overlay"
    assert embedder["CONVEYOR_REDIS_URL"] == gateway["CONVEYOR_REDIS_URL"]
    stream = StreamKeys(embedder["CONVEYOR_NAMESPACE"]).requests(model_id(extra_models[0], ""))
    scaled = one(docs, "ScaledObject", "conveyor-embedder")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "conveyor-embedder"
    assert {t["metadata"]["stream"] for t in scaled["triggers"]} == {stream}
    pod = one(docs, "Deployment", "conveyor-embedder")["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker", "the Redis policy lets it in"


def test_redis_persists_every_write_behind_a_password(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    config = one(docs, "ConfigMap", "conveyor-redis")["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in config and "appendfsync always" in config
    redis = one(docs, "StatefulSet", "conveyor-redis")
    spec = redis["spec"]["template"]["spec"]["containers"][0]
    assert spec["image"].startswith("redis:7")
    assert "--requirepass" in spec["args"]
    password = next(e for e in spec["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "conveyor-redis", "key": "password"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    for name in ("conveyor-gateway", "conveyor-worker"):
        url = env_of(container(docs, "Deployment", name))["CONVEYOR_REDIS_URL"]
        assert url == "redis://:$(REDIS_PASSWORD)@conveyor-redis:6379/0"


def test_only_gateways_workers_and_keda_reach_redis(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    policy = one(docs, "NetworkPolicy", "conveyor-redis")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "conveyor-redis"}
    (rule,) = policy["ingress"]
    pods, keda = rule["from"]
    (components,) = pods["podSelector"]["matchExpressions"]
    assert components["key"] == "app.kubernetes.io/component"
    assert set(components["values"]) == {"gateway", "worker", "monitor"}
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    deny = one(docs, "NetworkPolicy", "conveyor-default-deny")["spec"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "conveyor", "the default deny covers every pod"


def test_gateway_scales_and_survives_drains(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    hpa = one(docs, "HorizontalPodAutoscaler", "conveyor-gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "conveyor-gateway" and hpa["minReplicas"] >= 2
    assert one(docs, "PodDisruptionBudget", "conveyor-gateway")["spec"]["minAvailable"] == 1
    service = one(docs, "Service", "conveyor-gateway")["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc": 50051, "http": 8000, "metrics": 9400}
