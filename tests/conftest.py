"""Shared fixtures: one real Redis, the real default model's path and the standard workload."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from client.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
# CONVEYOR_TEST_MODEL: a checkpoint of the default model's shape in its place (the GPU check's,
# with random weights, where the real ones cannot be carried).
MODEL_DIR = Path(os.environ.get("CONVEYOR_TEST_MODEL") or ROOT / "models" / "smollm2-135m-instruct")
EMBEDDER_DIR = ROOT / "models" / "all-minilm-l6-v2"
WORKLOAD = ROOT / "bench" / "standard-workload.jsonl"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"the default model is missing: run `make model` (expected {MODEL_DIR})")
    return MODEL_DIR


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    if not (EMBEDDER_DIR / "config.json").exists():
        pytest.fail(f"the default embedder is missing: run `make model` (expected {EMBEDDER_DIR})")
    return EMBEDDER_DIR


@pytest.fixture(scope="session")
def workload() -> list[dict[str, object]]:
    return [json.loads(line) for line in WORKLOAD.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture()
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of the session's Redis."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
