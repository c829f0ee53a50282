"""The one refusal check, for generation jobs (pure: no model, no Redis)."""

import pytest

from checkpoints import ModelKind
from protos import inference_pb2, jobs_pb2
from worker.job_check import JobLimits, refusal

LIMITS = JobLimits(ModelKind.GENERATE, vocab_size=100, max_context=16)
SAMPLING = jobs_pb2.Sampling(max_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def job(prompt: list[int], sampling: jobs_pb2.Sampling = SAMPLING) -> jobs_pb2.Job:
    return jobs_pb2.Job(request_id="r", gateway_id="g", prompt_token_ids=prompt, sampling=sampling)


@pytest.mark.parametrize(
    ("candidate", "delivered", "problem"),
    [
        (job([]), 0, "empty prompt"),
        (job([1, 100]), 0, "token id 100 outside the vocabulary (size 100)"),
        (
            job(
                [1],
                jobs_pb2.Sampling(max_tokens=4, temperature=float("nan"), top_p=1.0, repetition_penalty=1.0),
            ),
            0,
            "malformed sampling: temperature finite and >= 0",
        ),
        (
            job([1], jobs_pb2.Sampling(max_tokens=4, top_p=1.0, repetition_penalty=1.0, top_k=101)),
            0,
            "malformed sampling: top_k <= vocabulary size",
        ),
        (job([1] * 16), 0, "16 tokens leave no room to generate within the context limit of 16"),
        (job([1] * 10), 6, "16 tokens leave no room to generate within the context limit of 16"),
        (
            jobs_pb2.Job(request_id="r", embed=jobs_pb2.EmbedTask(inputs=[inference_pb2.TokenIds(ids=[1])])),
            0,
            "an embedding job sent to a generation model",
        ),
    ],
)
def test_a_job_that_can_never_run_is_named(candidate: jobs_pb2.Job, delivered: int, problem: str) -> None:
    assert refusal(candidate, delivered, LIMITS) == problem


def test_a_runnable_job_passes() -> None:
    assert refusal(job([1] * 10), 5, LIMITS) is None
