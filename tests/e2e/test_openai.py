"""The OpenAI-compatible front through the real `openai` SDK against a live gateway, Redis and
worker: chat and completions, streamed and not, n, logprobs, a JSON schema through response_format,
embeddings, the error statuses, API keys, and a client that leaves mid-stream freeing its job."""

import json

import httpx2 as httpx
import jsonschema
import openai
import pytest
import redis

from client.library import ConveyorClient, vectors_of
from client.redis_server import RedisServer, free_port
from protos.redis_layout import StreamKeys
from tests.e2e.cluster import start_gateway, stop_process, wait_for, worker_statuses
from tests.e2e.conftest import Cluster

MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)


def test_greedy_chat_over_http_equals_grpc_streamed_or_not(api: openai.OpenAI, cluster: Cluster) -> None:
    with ConveyorClient(cluster.address) as client:
        expected = client.generate(messages=CHAT, max_tokens=24, temperature=0.0)
    whole = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    assert (
        whole.choices[0].finish_reason
        == {"FINISH_REASON_STOP": "stop", "FINISH_REASON_LENGTH": "length"}[expected.finish_reason]
    )
    assert whole.usage is not None and whole.usage.prompt_tokens == expected.prompt_tokens
    assert whole.usage.completion_tokens == expected.completion_tokens
    chunks = list(
        api.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_completions_of_several_prompts_number_their_choices_prompt_by_prompt(api: openai.OpenAI) -> None:
    texts = ["The capital of France is", "One, two, three,"]
    reply = api.completions.create(
        model=MODEL, prompt=texts, max_tokens=8, temperature=0.8, seed=3, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in reply.choices)
    alone = [
        api.completions.create(
            model=MODEL,
            prompt=text,
            max_tokens=8,
            temperature=0.8,
            seed=3,
            n=2,
            extra_body={"ignore_eos": True},
        )
        for text in texts
    ]
    assert [c.text for c in reply.choices] == [c.text for a in alone for c in a.choices]
    assert reply.usage is not None and reply.usage.completion_tokens == 4 * 8
    streamed = api.completions.create(
        model=MODEL,
        prompt=texts,
        max_tokens=8,
        temperature=0.8,
        seed=3,
        n=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
    assert [pieces[i] for i in range(4)] == [c.text for c in reply.choices]
    tokens = api.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=4, temperature=0)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 4


def test_logprobs_in_each_endpoints_shape(api: openai.OpenAI) -> None:
    chat = api.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.token == token.top_logprobs[0].token  # greedy: the most likely one
    text = api.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert "".join(logprobs.tokens or []) == text.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


def test_response_format_json_schema_and_vllm_structured_outputs(api: openai.OpenAI) -> None:
    reply = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city and its country, as JSON."}],
        max_tokens=60,
        temperature=0.7,
        seed=1,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content or ""), CITY)
    choice = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].message.content in ("yes", "no")


def test_embeddings_as_floats_and_base64_equal_grpc(api: openai.OpenAI, cluster: Cluster) -> None:
    texts = ["A man is eating food.", "A girl with a baby."]
    with ConveyorClient(cluster.address) as client:
        expected = vectors_of(client.embed(texts, model=EMBEDDER))
    floats = api.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    for data, vector in zip(floats.data, expected, strict=True):
        assert data.embedding == pytest.approx(vector, abs=1e-6)
    sdk_default = api.embeddings.create(model=EMBEDDER, input=texts[0])  # the SDK asks for base64
    assert sdk_default.data[0].embedding == pytest.approx(expected[0], abs=1e-6)
    assert floats.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        api.embeddings.create(model=EMBEDDER, input="x", dimensions=8)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"temperature": -1}, "temperature", "outside [0.0, 100.0]"),
        ({"max_tokens": 10**6}, "max_tokens", "exceeds the context"),
        ({"logit_bias": {"999999": 5}}, "logit_bias", "outside the vocabulary"),
        ({"n": 17}, "n", "at most 16"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
            "strin",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"max_tokens": 2**40}, "max_tokens", "less than or equal to 4294967295"),
        ({"logit_bias": {"99999999999": 1}}, "logit_bias", "is not a token id"),
        ({"stop": 5}, "stop", "valid"),
        (
            {
                "extra_body": {"structured_outputs": {"regex": "a"}},
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "not both",
        ),
    ],
)
def test_a_bad_field_is_400_naming_it(api: openai.OpenAI, fields: dict, param: str, fragment: str) -> None:  # type: ignore[type-arg]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**body)
    error = refused.value.body
    assert error["param"] == param and fragment in error["message"], error  # type: ignore[index]
    assert error["type"] == "invalid_request_error"  # type: ignore[index]


def test_unknown_model_is_404_and_the_side_endpoints_answer(api: openai.OpenAI, cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    assert {m.id for m in api.models.list()} == {MODEL, EMBEDDER}
    http = httpx.Client(base_url=cluster.http_url)
    assert http.get("/health").status_code == 200
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > 0
    assert (
        http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()["prompt"]
        == "Hello world"
    )
    chat = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    with ConveyorClient(cluster.address) as client:
        assert chat["count"] == client.generate(messages=CHAT, max_tokens=1).prompt_tokens
    metrics = http.get("/metrics").text
    assert (
        'conveyor:e2e_request_latency_seconds_count{api="openai",model_name="smollm2-135m-instruct"}'
        in metrics
    )
    assert http.get("/v1/nothing").status_code == 404


def test_a_client_that_leaves_mid_stream_frees_its_job(cluster: Cluster) -> None:
    keys = StreamKeys(cluster.namespace)
    client = redis.Redis.from_url(cluster.redis_url)
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "stream": True}
    with httpx.stream(
        "POST", f"{cluster.http_url}/v1/completions", json={**body, "ignore_eos": True}
    ) as reply:
        assert reply.status_code == 200
        events = (line for line in reply.iter_lines() if line.startswith("data: "))
        for _ in range(5):
            next(events)
        assert client.xlen(keys.requests(MODEL)) == 1
    assert wait_for(lambda: client.xlen(keys.requests(MODEL)) == 0, timeout_s=30), "the job still runs"
    assert wait_for(
        lambda: all(s.num_running == 0 for s in worker_statuses(cluster.redis_url, cluster.namespace))
    )
    client.close()


def test_past_its_deadline_a_request_is_504(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}
    reply = httpx.post(
        f"{cluster.http_url}/v1/completions", json=body, headers={"x-request-timeout": "1"}, timeout=60
    )
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "timeout_error"


def test_a_model_without_a_live_worker_is_503(redis_server: RedisServer, cluster: Cluster) -> None:
    port = free_port()
    gateway, _ = start_gateway(
        redis_server.url, "no-workers", cluster.model_dir, cluster.log_dir, "--http-port", str(port)
    )
    try:
        assert wait_for(lambda: _status(f"http://127.0.0.1:{port}/health") == 503, timeout_s=60)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"]
    finally:
        assert stop_process(gateway) == 0


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return -1


def test_a_stream_refused_before_its_first_token_gets_its_status(cluster: Cluster) -> None:
    grammar = 'start: <|not_a_token|> "x"'  # compiles at the gateway; the worker's tokenizer refuses it
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True}
    reply = httpx.post(
        f"{cluster.http_url}/v1/chat/completions",
        json={**body, "structured_outputs": {"grammar": grammar}},
        timeout=60,
    )
    assert reply.status_code == 400 and "unknown special token" in reply.json()["error"]["message"]


def test_nulls_vllm_fields_and_masked_logprobs_are_served(api: openai.OpenAI, cluster: Cluster) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 4,
        "n": None,
        "presence_penalty": None,
        "stream": None,
        "seed": -5,  # vLLM takes any integer
        "priority": -1,
        "guided_choice": ["yes", "no"],  # vLLM's older name of structured_outputs.choice
        "logprobs": True,
        "top_logprobs": 3,  # the third most likely is masked out by the choice: -inf, reported finite
    }
    reply = httpx.post(f"{cluster.http_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"] in ("yes", "no")
    assert all(
        top["logprob"] >= -9999.0 for token in choice["logprobs"]["content"] for top in token["top_logprobs"]
    )
    refused = httpx.post(
        f"{cluster.http_url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi"},
        headers={"x-request-timeout": "inf"},
        timeout=60,
    )
    assert refused.status_code == 400 and "x-request-timeout" in refused.json()["error"]["message"]
