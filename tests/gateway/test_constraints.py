"""Structured-output constraints at the gateway: at most one, within the size limit, and compiled by
llguidance, whose own message names what is wrong under the field's name."""

import json

import pytest

from gateway.constraints import MAX_CONSTRAINT_BYTES, compile_constraint, constraint_of
from gateway.errors import InvalidRequest
from protos import inference_pb2


def compiled(**fields: object) -> str:
    constraint = constraint_of(inference_pb2.SamplingParams(**fields))  # type: ignore[arg-type]
    assert constraint is not None
    return compile_constraint(*constraint)


@pytest.mark.parametrize(
    "fields",
    [
        {"json": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})},
        {"json_object": True},
        {"regex": "[0-9]{3}-[0-9]{4}"},
        {"choice": ["yes", "no"]},
        {"grammar": 'start: "a" NAME\nNAME: /[a-z]+/'},  # Lark
        {"grammar": 'root ::= "yes" | "no"'},  # GBNF
    ],
)
def test_every_kind_compiles_to_a_grammar(fields: dict[str, object]) -> None:
    assert compiled(**fields)


def test_no_constraint_is_none() -> None:
    assert constraint_of(inference_pb2.SamplingParams(temperature=0.0)) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json": "{not json"}, "sampling.json: key must be a string"),
        ({"json": '{"type": "strin"}'}, "sampling.json: Invalid type: strin"),
        ({"regex": "[a-z"}, "sampling.regex: "),
        ({"grammar": "start: undefined_rule"}, "sampling.grammar: "),
        ({"choice": ["yes", ""]}, "sampling.choice[1]: must not be empty"),
        (
            {"json_object": True, "regex": "a"},
            "sampling: set at most one of json, json_object, regex, choice, grammar",
        ),
        ({"regex": "a" * (MAX_CONSTRAINT_BYTES + 1)}, f"exceed the limit of {MAX_CONSTRAINT_BYTES}"),
    ],
)
def test_a_bad_constraint_is_refused_naming_its_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        compiled(**fields)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regex": "a+", "min_tokens": 3}, "sampling.min_tokens: cannot be combined with sampling.regex"),
        ({"json_object": True, "allowed_token_ids": [1]}, "sampling.allowed_token_ids: cannot be combined"),
    ],
)
def test_fields_that_could_leave_no_token_to_sample_are_refused_with_a_constraint(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        constraint_of(inference_pb2.SamplingParams(**fields))  # type: ignore[arg-type]
