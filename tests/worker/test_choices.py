"""n completions in the engine: the prompt is computed once, the choices read its shared KV blocks
(each copying the partly filled last one before it writes there), and seeded choices are
reproducible in any batch, under preemption and alone."""

import dataclasses
import re
from pathlib import Path

from gateway.constraints import compile_constraint
from protos import jobs_pb2
from protos.redis_layout import ChoiceProgress
from scheduler import SamplingParams
from worker.job_codec import sequences_from_job
from worker.llm import LLM

PROMPT = "<|im_start|>user\nName a colour and say why you like it.<|im_end|>\n<|im_start|>assistant\n"
_BLOCK_BYTES = 16 * 46080  # one block of 16 tokens of SmolLM2-135M in float32


def test_greedy_choices_read_the_shared_prompt_as_one_sequence_does(model_dir: Path) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    prompt = llm.tokenizer.encode(PROMPT)
    assert len(prompt) % 16, "the last prompt block is partly filled: the choices copy it"
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    (alone,) = llm.generate([prompt], greedy)
    fed_before = llm.core.stats.num_tokens
    choices = llm.generate([prompt], dataclasses.replace(greedy, n=3))
    assert [c.choice_index for c in choices] == [0, 1, 2]
    assert all(c.token_ids == alone.token_ids for c in choices)
    # The prompt once, then each choice's tokens after its first: nothing computed twice.
    assert llm.core.stats.num_tokens - fed_before == len(prompt) + 3 * (20 - 1)


def test_seeded_choices_are_reproducible_in_any_batch_and_under_preemption(model_dir: Path) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=7, n=4)
    roomy = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    first = roomy.generate([PROMPT], seeded)
    assert len({tuple(c.token_ids) for c in first}) > 1, "each choice samples its own stream"
    others = SamplingParams(max_tokens=30, temperature=1.0)
    batched = roomy.generate(["Count to ten:", PROMPT, "Once upon a time"], [others, seeded, others])
    assert [c.token_ids for c in batched[1:5]] == [c.token_ids for c in first]
    (solo,) = roomy.generate([PROMPT], dataclasses.replace(seeded, n=1))
    assert solo.token_ids == first[0].token_ids, "choice 0 is the request with n = 1"

    tight = LLM(model=model_dir, kv_cache_bytes=14 * _BLOCK_BYTES, max_model_len=128)
    pressed = tight.generate([PROMPT, PROMPT], [seeded, dataclasses.replace(seeded, seed=8)])
    assert tight.core.scheduler.num_preemptions > 0
    assert [c.token_ids for c in pressed[:4]] == [c.token_ids for c in first]


def test_each_constrained_choice_has_its_own_matcher(model_dir: Path) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    grammar = compile_constraint("regex", "[a-z]{2,8}-[0-9]{3}")
    choices = llm.generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=5, grammar=grammar)
    )
    assert len(choices) == 5
    for choice in choices:
        assert re.fullmatch("[a-z]{2,8}-[0-9]{3}", choice.text), choice.text
    assert len({c.text for c in choices}) > 1
    assert len(llm.core.runner.matchers or ()) == 0, "every matcher is dropped with its choice"


def test_a_resumed_job_goes_on_with_each_choice_where_its_client_stands(model_dir: Path) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    prompt = llm.tokenizer.encode(PROMPT)
    undisturbed = llm.generate(
        [prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3, ignore_eos=True)
    )
    sampling = jobs_pb2.Sampling(
        max_tokens=16,
        temperature=1.0,
        top_p=1.0,
        repetition_penalty=1.0,
        seed=5,
        n=3,
        ignore_eos=True,
        logprobs=-1,
    )
    job = jobs_pb2.Job(request_id="resumed", prompt_token_ids=prompt, sampling=sampling)
    progress = (
        ChoiceProgress(tuple(undisturbed[0].token_ids[:5])),
        ChoiceProgress(tuple(undisturbed[1].token_ids), finished=True),  # its last chunk went out
        ChoiceProgress(),  # nothing delivered yet
    )
    for seq in sequences_from_job(job, progress):
        llm.core.add(seq)
    resumed: dict[int, list[int]] = {}
    while not llm.core.scheduler.is_idle:
        step = llm.core.step()
        for chunk in step.chunks if step is not None else []:
            resumed.setdefault(chunk.choice_index, []).extend(chunk.token_ids)
    assert resumed == {0: undisturbed[0].token_ids[5:], 2: undisturbed[2].token_ids}
