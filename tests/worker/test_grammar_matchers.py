"""Constrained decoding in the engine: seeded constrained sampling gives the same tokens alone and
in any batch, and preemption (recompute) and prefix-cache hits leave the matchers' state intact."""

import json
from pathlib import Path

import jsonschema

from gateway.constraints import compile_constraint
from scheduler import SamplingParams
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
