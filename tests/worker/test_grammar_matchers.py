"""Constrained decoding in the engine: seeded constrained sampling gives the same tokens alone and
in any batch, and preemption (recompute) and prefix-cache hits leave the matchers' state intact."""

import json
from pathlib import Path

import jsonschema

from checkpoints import ModelKind
from gateway.constraints import compile_constraint
from protos import jobs_pb2
from scheduler import SamplingParams
from worker.grammar_matchers import GrammarMatchers
from worker.job_check import JobLimits, refusal
from worker.llm import LLM

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
PROMPTS = [
    f"<|im_start|>user\nA city number {n}, as JSON.<|im_end|>\n<|im_start|>assistant\n" for n in range(8)
]


def test_seeded_constrained_sampling_is_batch_invariant_and_survives_preemption(model_dir: Path) -> None:
    grammar = compile_constraint("json", json.dumps(SCHEMA))
    seeded = SamplingParams(max_tokens=60, temperature=0.8, seed=42, grammar=grammar)
    free = SamplingParams(max_tokens=60, temperature=1.0)
    roomy = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    alone = roomy.generate([PROMPTS[0]], seeded)[0]
    batch = roomy.generate(PROMPTS, [seeded] + [free, seeded] * 3 + [free])  # prefix hits on PROMPTS[0]
    assert batch[0].token_ids == alone.token_ids
    tight = LLM(model=model_dir, kv_cache_bytes=34 * 16 * 46080, max_model_len=512)  # 34 blocks: preempts
    # EOS ignored: past the end of the JSON only EOS may come, so each sequence fills its 80 tokens.
    constrained = [SamplingParams(max_tokens=80, temperature=0.0, grammar=grammar, ignore_eos=True)] * len(
        PROMPTS
    )
    preempted = tight.generate(PROMPTS, constrained)
    assert tight.core.scheduler.num_preemptions > 0
    assert [c.token_ids for c in preempted] == [c.token_ids for c in roomy.generate(PROMPTS, constrained)]
    for completion in [alone, *preempted]:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert tight.core.runner.matchers is not None and len(tight.core.runner.matchers) == 0, "all dropped"


def test_a_grammar_the_tokenizer_cannot_match_is_refused_by_the_worker(model_dir: Path) -> None:
    matchers = GrammarMatchers(model_dir, vocab_size=49152, eos_token_ids=(2,))
    limits = JobLimits(ModelKind.GENERATE, 49152, 2048, matchers.error_of)

    def job_with(grammar_text: str) -> jobs_pb2.Job:
        sampling = jobs_pb2.Sampling(max_tokens=4, top_p=1.0, repetition_penalty=1.0)
        sampling.grammar = compile_constraint("grammar", grammar_text)  # compiles without a tokenizer
        return jobs_pb2.Job(request_id="r", prompt_token_ids=[1, 2], sampling=sampling)

    problem = refusal(job_with('start: <|not_a_token|> "x"'), 0, limits)
    assert problem is not None and 'unknown special token: "<|not_a_token|>"' in problem
    assert refusal(job_with("start: <|im_end|>"), 0, limits) is None
