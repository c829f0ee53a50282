"""deploy/docker: what the images copy exists and survives the .dockerignore, the gateway image has
no torch, both run as a non-root user, and the settings they set exist. (Building the images needs a
Docker daemon and registries this suite does not have.)"""

import re
import shlex
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"gateway": GatewaySettings, "worker": WorkerSettings}


def stages(name: str) -> list[list[tuple[str, str]]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / f"{name}.Dockerfile").read_text())
    result: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("name", IMAGES)
def test_copied_sources_exist_and_are_not_ignored(name: str) -> None:
    ignore = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:] for line in ignore if line.startswith("!")}
    for stage in stages(name):
        for instruction, rest in stage:
            if instruction != "COPY" or rest.startswith("--from"):
                continue
            *sources, _target = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source in included, f"{source} is excluded by the .dockerignore"


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_runs_as_a_non_root_user_with_real_settings(name: str) -> None:
    final = stages(name)[-1]
    users = [rest for instruction, rest in final if instruction == "USER"]
    assert users and users[-1] not in ("0", "root")
    for instruction, rest in final:
        if instruction == "ENV":
            for variable in re.findall(r"(CONVEYOR_\w+)=", rest):
                assert variable.removeprefix("CONVEYOR_").lower() in IMAGES[name].model_fields, variable


def test_the_gateway_image_installs_no_torch() -> None:
    final = stages("gateway")[-1]
    runs = " ".join(rest for instruction, rest in final if instruction == "RUN")
    assert "torch" not in runs and "[worker]" not in runs
    assert "pip install --no-cache-dir ." in runs
    assert any(i == "FROM" and "slim" in rest for i, rest in final)


def test_the_worker_image_is_cuda_by_default() -> None:
    (header, *_) = stages("worker")
    args = dict(rest.split("=", 1) for instruction, rest in header if instruction == "ARG")
    assert args["BASE"].startswith("nvidia/cuda:")
    runs = " ".join(rest for stage in stages("worker") for i, rest in stage if i == "RUN")
    assert "'.[worker]'" in runs and "worker.fetch_model" in runs
