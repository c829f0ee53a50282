"""The embeddings worker's side of the serving loop: which jobs it refuses, how long the loop may
block while a batch fills, and the one chunk that carries a call's vectors."""

import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from protos import inference_pb2, jobs_pb2
from scheduler.embedding_batcher import EmbeddingBatcherConfig
from worker.embedding_backend import EmbeddingBackend
from worker.embedding_core import EmbeddingCore
from worker.embedding_model import EmbeddingModel
from worker.job_check import refusal
from worker.metrics import StepMetrics


@pytest.fixture(scope="module")
def backend(embedder_dir: Path) -> EmbeddingBackend:
    core = EmbeddingCore(
        EmbeddingModel(embedder_dir, torch.device("cpu")), EmbeddingBatcherConfig(4096, 4, max_wait_s=0.2)
    )
    return EmbeddingBackend(core, StepMetrics(CollectorRegistry(), "emb"))


def embed_job(request_id: str, *inputs: list[int]) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        request_id=request_id,
        embed=jobs_pb2.EmbedTask(inputs=[inference_pb2.TokenIds(ids=ids) for ids in inputs]),
    )


@pytest.mark.parametrize(
    ("job", "refusal_text"),
    [
        (jobs_pb2.Job(request_id="g", prompt_token_ids=[1]), "a generation job sent to an embedding model"),
        (embed_job("e"), "no inputs"),
        (embed_job("e", [101, 102], []), "input 1 is empty"),
        (embed_job("e", [101, 999_999]), "input 0: token id 999999 outside the vocabulary (30522)"),
        (embed_job("e", [101] * 257), "input 0: 257 tokens exceed the model's 256"),
    ],
)
def test_jobs_it_can_never_run_are_named(
    backend: EmbeddingBackend, job: jobs_pb2.Job, refusal_text: str
) -> None:
    assert refusal(job, 0, backend.limits) == refusal_text


def test_a_call_waits_for_its_batch_then_comes_back_on_one_chunk(backend: EmbeddingBackend) -> None:
    assert backend.block_ms(100) == 100  # idle: block as long as the loop likes
    job = embed_job("call", [101, 7592, 102], [101, 2088, 2003, 102])
    assert refusal(job, 0, backend.limits) is None
    backend.start(job, ())
    wait_ms = backend.block_ms(100)
    assert wait_ms is not None and 1 <= wait_ms <= 200  # the batch fills for at most max_wait_s
    assert backend.step() == []
    for n in range(3):  # five inputs queued, four fit a batch: it is full, due now
        backend.start(embed_job(f"more{n}", [101, 2000 + n, 102]), ())
    assert backend.block_ms(100) is None
    # The oldest input and the three nearest to it in length: the call's longer input waits.
    chunks = backend.step()
    assert [c.request_id for c in chunks] == ["more0", "more1", "more2"]
    assert [len(c.embeddings) for c in chunks] == [1, 1, 1]
    time.sleep(0.25)
    (call,) = backend.step()
    assert call.request_id == "call" and call.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert call.prompt_tokens == 7 and [len(e.values) for e in call.embeddings] == [384, 384]
    assert backend.block_ms(100) == 100
