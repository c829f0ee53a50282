"""Every rejected field gets INVALID_ARGUMENT with a message naming it (pure checks, no server)."""

import pytest

from checkpoints import SamplingDefaults
from gateway.errors import InvalidRequest
from gateway.validation import Limits, check_input, check_prompt_length, check_request_id, resolve_sampling
from protos import inference_pb2

LIMITS = Limits(vocab_size=1000, max_context=512, default_max_tokens=64)


def sampling(**fields: object) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (sampling(temperature=-0.5), "sampling.temperature"),
        (sampling(temperature=float("nan")), "sampling.temperature"),
        (sampling(top_p=0.0), "sampling.top_p"),
        (sampling(top_p=1.5), "sampling.top_p"),
        (sampling(min_p=2.0), "sampling.min_p"),
        (sampling(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (sampling(presence_penalty=3.0), "sampling.presence_penalty"),
        (sampling(frequency_penalty=-2.5), "sampling.frequency_penalty"),
        (sampling(max_tokens=512), "sampling.max_tokens"),
        (sampling(max_tokens=10, min_tokens=11), "sampling.min_tokens"),
        (sampling(stop=[""]), "sampling.stop[0]"),
        (sampling(logit_bias={5: 101.0}), "sampling.logit_bias[5]"),
        (sampling(logit_bias={1000: 1.0}), "sampling.logit_bias"),
        (sampling(logit_bias={i: 1.0 for i in range(301)}), "sampling.logit_bias"),
        (sampling(allowed_token_ids=[3, 1000]), "sampling.allowed_token_ids[1]"),
        (sampling(stop=["x"] * 17), "sampling.stop"),
        (sampling(stop_token_ids=[5, 1000]), "sampling.stop_token_ids[1]"),
        (sampling(logprobs=21), "sampling.logprobs"),
        (sampling(top_k=1001), "sampling.top_k"),  # a worker would refuse it: found by test_fuzz
    ],
)
def test_bad_sampling_value_names_its_field(params: inference_pb2.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        resolve_sampling(params, LIMITS)
    assert error.value.message.startswith(f"{field}:")


def test_unset_sampling_takes_documented_defaults() -> None:
    resolved = resolve_sampling(sampling(), LIMITS)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_p, resolved.repetition_penalty) == (
        64,
        1,
        1,
        1,
    )
    assert resolved.logprobs == -1 and not resolved.HasField("seed")
    assert resolve_sampling(sampling(temperature=0.0, seed=7, logprobs=0), LIMITS).temperature == 0.0


def test_unset_sampling_takes_the_checkpoint_defaults_and_set_fields_override_them() -> None:
    defaults = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1)
    limits = Limits(vocab_size=1000, max_context=512, default_max_tokens=64, defaults=defaults)
    resolved = resolve_sampling(sampling(), limits)
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == pytest.approx((0.6, 0.95, 20))
    assert (resolved.min_p, resolved.repetition_penalty) == pytest.approx((0.05, 1.1))
    explicit = resolve_sampling(sampling(temperature=0.0, top_k=0, min_p=0.0, top_p=1.0), limits)
    assert (explicit.temperature, explicit.top_k, explicit.min_p, explicit.top_p) == (0.0, 0, 0.0, 1.0)
    assert explicit.repetition_penalty == pytest.approx(1.1)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({}, "input: set one of"),
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"chat": inference_pb2.Chat()}, "chat.messages: must not be empty"),
        (
            {"chat": inference_pb2.Chat(messages=[inference_pb2.ChatMessage(role="robot", content="x")])},
            "chat.messages[0].role",
        ),
        ({"token_ids": inference_pb2.TokenIds()}, "token_ids.ids: must not be empty"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1, 2, 5000])}, "token_ids.ids[2]: 5000 is outside"),
    ],
)
def test_bad_input_names_its_field(request_fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        check_input(inference_pb2.GenerateRequest(**request_fields), LIMITS)  # type: ignore[arg-type]
    assert error.value.message.startswith(message)


def test_prompt_filling_the_context_is_rejected_with_both_numbers() -> None:
    with pytest.raises(InvalidRequest, match="prompt: 600 tokens .* context of 512 tokens"):
        check_prompt_length(600, LIMITS)
    check_prompt_length(511, LIMITS)


def test_overlong_request_id_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="request_id: at most 256"):
        check_request_id("x" * 257)


def test_a_prompt_that_encodes_to_nothing_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="prompt: it encodes to no tokens"):
        check_prompt_length(0, LIMITS)
