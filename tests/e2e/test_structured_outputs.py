"""Structured outputs through the real gateway, Redis and worker: a JSON schema, any JSON object, a
regex, a choice and a grammar, over Generate and GenerateStream, greedy and sampled; the output
validates, and one cut at max_tokens is a prefix the constraint accepts; bad constraints are
INVALID_ARGUMENT naming the field."""

import json
import re
from pathlib import Path

import grpc
import jsonschema
import llguidance
import pytest
import tokenizers

from client.library import ConveyorClient, build_request
from gateway.constraints import compile_constraint
from protos import inference_pb2
from tests.e2e.cluster import conveyor_generate
from tests.e2e.conftest import Cluster
from tests.e2e.test_serving import BidiSession

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
GRAMMAR = 'start: "The answer is " ANSWER "."\nANSWER: /(yes|no|[0-9]+)/'
CHAT = [{"role": "user", "content": "Describe a person who keeps pets, as JSON."}]


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> ConveyorClient:
    return ConveyorClient(cluster.address)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_kind_of_constraint_holds_over_generate(client: ConveyorClient, sampled: bool) -> None:
    params = {"temperature": 0.9, "seed": 11} if sampled else {"temperature": 0.0}
    person = client.generate(messages=CHAT, max_tokens=120, json=json.dumps(PERSON), **params)
    assert person.finish_reason == "FINISH_REASON_STOP", person.text
    jsonschema.validate(json.loads(person.text), PERSON)
    short = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    anything = client.generate(messages=short, max_tokens=60, json_object=True, **params)
    assert isinstance(json.loads(anything.text), dict), anything.text
    phone = client.generate("My phone number is", max_tokens=30, regex=PHONE, **params)
    assert re.fullmatch(PHONE, phone.text), phone.text
    choice = client.generate(
        "Is the sky blue? Answer:", max_tokens=10, choice=["yes", "no", "it depends"], **params
    )
    assert choice.text in ("yes", "no", "it depends")
    answer = client.generate("Is water wet?", max_tokens=20, grammar=GRAMMAR, **params)
    assert re.fullmatch(r"The answer is (yes|no|[0-9]+)\.", answer.text), answer.text


def test_constraints_hold_over_generate_stream_beside_a_free_request(
    cluster: Cluster, client: ConveyorClient
) -> None:
    session = BidiSession(client.stub)
    session.send(
        inference_pb2.ClientFrame(
            generate=build_request(
                messages=CHAT, request_id="json", max_tokens=120, temperature=0.0, json=json.dumps(PERSON)
            )
        )
    )
    session.send(
        inference_pb2.ClientFrame(
            generate=build_request("Call", request_id="phone", max_tokens=30, temperature=0.0, regex=PHONE)
        )
    )
    session.send(
        inference_pb2.ClientFrame(
            generate=build_request("Hello", request_id="free", max_tokens=8, temperature=0.0, ignore_eos=True)
        )
    )
    session.close()
    text = {rid: "".join(f.response.text for f in frames) for rid, frames in session.frames.items()}
    jsonschema.validate(json.loads(text["json"]), PERSON)
    assert re.fullmatch(PHONE, text["phone"])
    assert sum(len(f.response.token_ids) for f in session.frames["free"]) == 8


def test_a_constrained_output_cut_at_max_tokens_is_a_prefix_the_schema_accepts(
    client: ConveyorClient, cluster: Cluster
) -> None:
    cut = client.generate(messages=CHAT, max_tokens=6, temperature=0.0, json=json.dumps(PERSON))
    assert cut.finish_reason == "FINISH_REASON_LENGTH" and len(cut.token_ids) == 6
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(cluster.model_dir) / "tokenizer.json"))
    matcher = llguidance.LLMatcher(
        llguidance.LLTokenizer(tokenizer.to_str()), compile_constraint("json", json.dumps(PERSON))
    )
    assert matcher.consume_tokens(cut.token_ids) and not matcher.is_error()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json": '{"type": "strin"}'}, "sampling.json: Invalid type: strin"),
        ({"regex": "[a-z"}, "sampling.regex: "),
        ({"grammar": "start: missing"}, "sampling.grammar: "),
        ({"choice": ["a", ""]}, "sampling.choice[1]: must not be empty"),
        ({"grammar": 'start: <|not_a_token|> "x"'}, 'unknown special token: "<|not_a_token|>"'),  # the worker
        ({"regex": "a", "json_object": True}, "sampling: set at most one of"),
        ({"logit_bias": {10**6: 1.0}}, "sampling.logit_bias: token 1000000 is outside the vocabulary"),
    ],
)
def test_a_bad_constraint_is_invalid_argument_naming_the_field(
    client: ConveyorClient, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("Hi", max_tokens=4, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")


def test_logit_bias_and_allowed_tokens_reach_the_sampler(client: ConveyorClient) -> None:
    allowed = client.generate(
        "Hi", max_tokens=6, temperature=1.0, allowed_token_ids=[100, 200], ignore_eos=True
    )
    assert set(allowed.token_ids) <= {100, 200}
    biased = client.generate("Hi", max_tokens=4, temperature=0.0, logit_bias={300: 100.0}, ignore_eos=True)
    assert biased.token_ids == [300] * 4


def test_conveyor_generate_takes_a_choice_and_a_schema_file(cluster: Cluster, tmp_path: Path) -> None:
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(PERSON))

    def generate(*args: str) -> str:
        return conveyor_generate(cluster.address, "--temperature", "0", *args).strip()

    assert generate("Is the sky blue?", "--choice", "yes", "--choice", "no") in ("yes", "no")
    jsonschema.validate(json.loads(generate("Describe a person.", "--json-schema", str(schema))), PERSON)
