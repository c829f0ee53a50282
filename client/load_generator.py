"""`conveyor bench --address`: load on a live gateway, at a fixed concurrency or a Poisson rate,
over gRPC or (`--api openai`) over the OpenAI HTTP API, Conveyor's or any other server's (vLLM's).

Prompts come from a JSONL file (`prompt_token_ids`, `messages` or `prompt`; optional `max_tokens`),
the standard workload by default. Each request streams; the report is what its client saw.
"""

import asyncio
import json
import logging
import random
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
from rich.progress import Progress

from client.library import Security, build_request
from protos import inference_pb2, inference_pb2_grpc


@dataclass(slots=True)
class RequestResult:
    sent_s: float  # since the run began
    status: str = "OK"  # or the gRPC status name
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token, since the run began
    ended_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.sent_s if self.token_times_s else None

    @property
    def inter_token_s(self) -> list[float]:
        times = self.token_times_s
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def load_prompts(
    path: Path, limit: int | None, default_max_tokens: int
) -> list[inference_pb2.GenerateRequest]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    requests = []
    for row in rows[:limit] if limit else rows:
        sampling: dict[str, Any] = {
            "max_tokens": row.get("max_tokens", default_max_tokens),
            "temperature": 0.0,
        }
        if "prompt_token_ids" in row:  # the standard workload: exact tokens, exact lengths
            requests.append(build_request(token_ids=row["prompt_token_ids"], ignore_eos=True, **sampling))
        elif "messages" in row:
            requests.append(build_request(messages=row["messages"], **sampling))
        else:
            requests.append(build_request(row["prompt"], **sampling))
    return requests


async def _one(
    stub: inference_pb2_grpc.InferenceStub,
    request: inference_pb2.GenerateRequest,
    metadata: tuple[tuple[str, str], ...],
    started: float,
) -> RequestResult:
    result = RequestResult(sent_s=time.perf_counter() - started)
    try:
        async for frame in stub.Generate(request, metadata=metadata):
            now = time.perf_counter() - started
            result.token_times_s += [now] * len(frame.token_ids)
    except grpc.aio.AioRpcError as error:
        result.status = error.code().name
    result.ended_s = time.perf_counter() - started
    return result


async def run_load(
    address: str,
    requests: list[inference_pb2.GenerateRequest],
    concurrency: int,
    request_rate: float | None,
    security: Security,
    seed: int = 0,
    api: str = "grpc",
    model_name: str = "",
) -> tuple[list[RequestResult], float]:
    """All requests, each sent when the concurrency allows or (with a rate) at Poisson arrivals;
    `api` "openai" sends them to the OpenAI API at `address` (host:port or a URL), for `model_name`."""
    if api == "openai":
        client = _http_client(address, security)
        try:
            return await _run(
                requests, concurrency, request_rate, seed, lambda r, t: _one_openai(client, r, model_name, t)
            )
        finally:
            await client.aclose()
    credentials = security.channel_credentials()
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        return await _run(
            requests, concurrency, request_rate, seed, lambda r, t: _one(stub, r, security.metadata, t)
        )
    finally:
        await channel.close()


async def _run(
    requests: list[inference_pb2.GenerateRequest],
    concurrency: int,
    request_rate: float | None,
    seed: int,
    send: Callable[[inference_pb2.GenerateRequest, float], Awaitable[RequestResult]],
) -> tuple[list[RequestResult], float]:
    slots = asyncio.Semaphore(concurrency)
    arrivals = random.Random(seed)
    started = time.perf_counter()
    with Progress(transient=True) as progress:
        bar = progress.add_task("requests", total=len(requests))

        async def limited(request: inference_pb2.GenerateRequest) -> RequestResult:
            async with slots:
                result = await send(request, started)
            progress.advance(bar)
            return result

        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if request_rate:
                await asyncio.sleep(arrivals.expovariate(request_rate))
        results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - started


def quiet_http_logs() -> None:
    """The HTTP client logs a line per request at INFO: it would bury the report."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _http_client(address: str, security: Security) -> "httpx.AsyncClient":
    """One HTTP client for the run, with the API key and TLS settings of the gRPC one."""
    base = address if address.startswith(("http://", "https://")) else f"http://{address}"
    verify: ssl.SSLContext | bool = True
    if security.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(security.ca_file))
        if security.cert_file is not None and security.key_file is not None:
            verify.load_cert_chain(str(security.cert_file), str(security.key_file))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    quiet_http_logs()
    return httpx.AsyncClient(
        base_url=base, headers=dict(security.metadata), timeout=None, verify=verify, limits=limits
    )


async def _one_openai(
    client: "httpx.AsyncClient", request: inference_pb2.GenerateRequest, model_name: str, started: float
) -> RequestResult:
    """One streamed OpenAI call. Tokens are dated by the chunk that brought their text; the count
    is the usage the server reports at the end (a chunk may carry several tokens)."""
    path, body = openai_body(request, model_name)
    result = RequestResult(sent_s=time.perf_counter() - started)
    completion_tokens = None
    try:
        async with client.stream("POST", path, json=body) as reply:
            if reply.status_code != 200:
                await reply.aread()
                result.status = f"HTTP {reply.status_code}"
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter() - started
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    result.status = f"error {chunk['error'].get('type', '')}".strip()
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        result.token_times_s.append(now)
    except httpx.HTTPError as error:
        result.status = type(error).__name__
    times = result.token_times_s
    if completion_tokens is not None and times and completion_tokens > len(times):
        times += [times[-1]] * (completion_tokens - len(times))
    result.ended_s = time.perf_counter() - started
    return result


def openai_body(request: inference_pb2.GenerateRequest, model_name: str) -> tuple[str, dict[str, Any]]:
    """The OpenAI endpoint and body of a gRPC request: a chat goes to chat completions, a text or
    token ids to completions; streamed, with the usage at the end."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model_name,
        "max_tokens": sampling.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sampling.HasField("temperature"):
        body["temperature"] = sampling.temperature
    if sampling.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra field, which Conveyor takes too
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return "/v1/chat/completions", {**body, "messages": messages}
    prompt: str | list[int] = list(request.token_ids.ids) if kind == "token_ids" else request.prompt
    return "/v1/completions", {**body, "prompt": prompt}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def summarize(results: list[RequestResult], seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == "OK"]
    tokens = sum(len(r.token_times_s) for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "seconds": round(seconds, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "requests_per_s": round(len(ok) / seconds, 3) if seconds else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "inter_token_s": percentiles([gap for r in ok for gap in r.inter_token_s]),
        "errors": dict(Counter(r.status for r in results if r.status != "OK")),
    }


def format_table(summary: dict[str, Any], address: str, mode: str) -> str:
    ttft, itl = summary["ttft_s"], summary["inter_token_s"]
    errors = ", ".join(f"{name} {count}" for name, count in sorted(summary["errors"].items())) or "none"
    return "\n".join(
        [
            f"target: {address}; {mode}; {summary['requests']} requests in {summary['seconds']:.1f} s",
            f"{'output tokens/s':24}{summary['output_tokens_per_s']:>10.1f}",
            f"{'requests/s':24}{summary['requests_per_s']:>10.2f}",
            f"{'':24}{'p50':>10}{'p90':>10}{'p99':>10}",
            f"{'time to first token s':24}" + "".join(f"{ttft[p]:>10.3f}" for p in ("p50", "p90", "p99")),
            f"{'inter-token latency ms':24}"
            + "".join(f"{1000 * itl[p]:>10.1f}" for p in ("p50", "p90", "p99")),
            f"errors: {errors}",
        ]
    )


def plot(results: list[RequestResult], path: Path) -> None:
    """Latency against time (first token and each later one) and the TTFT distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ttft_s is not None]
    figure, (over_time, histogram) = plt.subplots(1, 2, figsize=(12, 4.5))
    over_time.scatter([r.sent_s for r in ok], [r.ttft_s for r in ok], s=12, label="time to first token")
    gaps = [(r.token_times_s[i + 1], gap) for r in ok for i, gap in enumerate(r.inter_token_s)]
    if gaps:
        over_time.scatter(*zip(*gaps, strict=True), s=2, alpha=0.4, label="inter-token latency")
    over_time.set(xlabel="time since start (s)", ylabel="latency (s)", title="Latency over the run")
    over_time.legend()
    histogram.hist([r.ttft_s for r in ok], bins=30)
    histogram.set(xlabel="time to first token (s)", ylabel="requests", title="TTFT distribution")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
