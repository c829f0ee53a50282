"""The sampler applies each row's own parameters, whatever the other rows ask for."""

import math

import torch

from scheduler import SamplingParams, ScheduledSeq
from worker.sampler import Sampler


def item(
    history: list[int] | None = None, num_prompt: int = 0, index: int = 0, **params: object
) -> ScheduledSeq:
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    return ScheduledSeq(
        request_id="r",
        token_ids=[0],
        start_pos=0,
        block_ids=[0],
        needs_sample=True,
        sampling=sampling,
        num_output_tokens=index,
        history=history if sampling.has_penalties else None,
        num_prompt_tokens=num_prompt,
    )


LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])


def draws(params: dict[str, object], num: int = 400) -> set[int]:
    sampler = Sampler(torch.device("cpu"))
    return {sampler(LOGITS.clone(), [item(**params)])[0].token_id for _ in range(num)}


def test_greedy_and_seeded_rows_do_not_depend_on_their_neighbours() -> None:
    sampler = Sampler(torch.device("cpu"))
    flat = torch.zeros(1, 1000)
    seeded = item(temperature=1.0, seed=5, index=3)
    alone = sampler(flat.clone(), [seeded])[0].token_id
    tokens = sampler(torch.cat([LOGITS.flip(1), LOGITS]), [item(temperature=0.0), item(temperature=0.0)])
    assert [t.token_id for t in tokens] == [5, 0]
    batch = sampler(torch.cat([torch.zeros(1, 1000), flat]), [item(temperature=1.0), seeded])
    assert batch[1].token_id == alone


def test_top_k_top_p_and_min_p_limit_the_candidates() -> None:
    assert draws({"temperature": 1.0, "top_k": 2}) == {0, 1}
    assert draws({"temperature": 1.0, "top_p": 0.5}) == {0}  # token 0 alone holds ~64% of the mass
    assert draws({"temperature": 1.0, "min_p": 0.3}) == {0, 1}  # e^-1 = 0.37 >= 0.3 > e^-2
    assert draws({"temperature": 5.0}) == {0, 1, 2, 3, 4, 5}


def test_seed_and_index_fix_the_draw() -> None:
    sampler = Sampler(torch.device("cpu"))
    flat = torch.zeros(1, 1000)
    first = [sampler(flat.clone(), [item(temperature=1.0, seed=7, index=i)])[0].token_id for i in range(5)]
    again = [sampler(flat.clone(), [item(temperature=1.0, seed=7, index=i)])[0].token_id for i in range(5)]
    other = [sampler(flat.clone(), [item(temperature=1.0, seed=8, index=i)])[0].token_id for i in range(5)]
    assert first == again and first != other and len(set(first)) > 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    sampler = Sampler(torch.device("cpu"))
    penalized = sampler._apply_penalties(LOGITS.clone(), [item(history=[0, 5], repetition_penalty=2.0)])
    assert penalized[0, 0] == 2.0 and penalized[0, 5] == -2.0 and penalized[0, 1] == 3.0


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    sampler = Sampler(torch.device("cpu"))
    params = {"presence_penalty": 0.5, "frequency_penalty": 0.25}
    penalized = sampler._apply_penalties(LOGITS.clone(), [item(history=[3, 1, 1], num_prompt=1, **params)])
    assert penalized[0, 1] == 3.0 - 0.5 - 2 * 0.25
    assert penalized[0, 3] == 1.0  # in the prompt only


def test_logprobs_report_the_sampled_token_and_the_top_alternatives() -> None:
    sampler = Sampler(torch.device("cpu"))
    (token,) = sampler(LOGITS.clone(), [item(temperature=0.0, logprobs=2)])
    expected = torch.log_softmax(LOGITS[0], dim=-1)
    assert token.token_id == 0 and math.isclose(token.logprob or 0.0, float(expected[0]), rel_tol=1e-6)
    assert [t for t, _ in token.top_logprobs] == [0, 1]


def test_banned_tokens_are_never_picked() -> None:
    sampler = Sampler(torch.device("cpu"))
    greedy = item(temperature=0.0)
    banned = ScheduledSeq(**{**{f: getattr(greedy, f) for f in greedy.__slots__}, "banned_token_ids": (0, 1)})  # type: ignore[arg-type]
    tokens = sampler(torch.cat([LOGITS, LOGITS]), [greedy, banned])
    assert [t.token_id for t in tokens] == [0, 2]


def bitmask(allowed_per_row: list[list[int] | None], vocab: int) -> torch.Tensor:
    """An llguidance-layout bitmask: one bit per token, 32 tokens an int32 word; None = every token."""
    words = -(-vocab // 32)
    mask = torch.zeros(len(allowed_per_row), words, dtype=torch.int64)
    for row, allowed in enumerate(allowed_per_row):
        for token in range(words * 32) if allowed is None else allowed:
            mask[row, token // 32] |= 1 << (token % 32)
    return torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)


def test_grammar_masks_apply_per_row_beside_free_rows_penalties_and_logprobs() -> None:
    sampler = Sampler(torch.device("cpu"))
    vocab = 70  # more than two mask words, the last one partial
    logits = torch.arange(vocab, dtype=torch.float32).repeat(4, 1)  # the highest id is the most likely
    items = [
        item(temperature=0.0),  # constrained, greedy
        item(temperature=0.0),  # free
        item(temperature=1.0, seed=3, logprobs=2),  # constrained, sampled, with logprobs
        item(history=[1, 64], num_prompt=1, temperature=0.0, repetition_penalty=4.0),  # constrained + penalty
    ]
    masks = bitmask([[5, 33, 64], None, [40, 41], [33, 64]], vocab)
    tokens = sampler(logits.clone(), items, masks)
    assert [t.token_id for t in tokens[:2]] == [64, 69]
    assert tokens[2].token_id in (40, 41) and {token for token, _ in tokens[2].top_logprobs} == {40, 41}
    assert tokens[3].token_id == 33  # 64 is allowed but penalised below 33
    for _ in range(50):
        assert sampler(logits[2:3].clone(), items[2:3], masks[2:3])[0].token_id in (40, 41)


def test_allowed_tokens_and_logit_bias() -> None:
    sampler = Sampler(torch.device("cpu"))
    logits = torch.zeros(2, 10)
    items = [
        item(temperature=0.0, allowed_token_ids=(2, 7), logit_bias=((7, 5.0),)),
        item(temperature=0.0, logit_bias=((3, 100.0), (9, -100.0))),
    ]
    assert [t.token_id for t in sampler(logits.clone(), items)] == [7, 3]
    assert {sampler(logits.clone(), [item(allowed_token_ids=(4, 6))])[0].token_id for _ in range(100)} == {
        4,
        6,
    }
