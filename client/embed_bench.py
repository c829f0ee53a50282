"""`conveyor bench --embed`: embedding calls through a gateway, Redis and an embeddings worker under
concurrency, beside a plain transformers loop that encodes the same texts one at a time.

Texts: the user messages of the standard workload (passages, 17 to ~1,300 characters, cut at the
model's limit) and their first lines (short queries), repeated up to `--num-texts`. Without
`--address`, a private stack (`conveyor serve --model <embedder>`) is started and stopped around the
run, so the baseline afterwards has the machine to itself.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from checkpoints import PoolingConfig
from client.library import AsyncConveyorClient, Security, vectors_of
from client.load_generator import percentiles
from client.redis_server import free_port

_WARMUP_CALLS = 8
_START_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True)
class EmbedRow:
    name: str
    num_texts: int
    seconds: float
    latencies_s: list[float]  # per call, as its client saw it

    @property
    def embeddings_per_s(self) -> float:
        return self.num_texts / self.seconds if self.seconds else 0.0

    def figures(self) -> dict[str, object]:
        return {
            "name": self.name,
            "texts": self.num_texts,
            "seconds": round(self.seconds, 3),
            "embeddings_per_s": round(self.embeddings_per_s, 1),
            "latency_ms": {p: round(1000 * v, 1) for p, v in percentiles(self.latencies_s).items()},
        }


def embedding_texts(workload: Path, count: int) -> list[str]:
    """Mixed lengths: each workload message whole, and its first line alone."""
    rows = [json.loads(line) for line in workload.read_text().splitlines() if line.strip()]
    messages = [row["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0] for row in rows]
    distinct = [text for message in messages for text in (message, message.split("\n")[0]) if text.strip()]
    return [distinct[i % len(distinct)] for i in range(count)]


async def run_load(
    address: str, texts: list[str], concurrency: int, texts_per_call: int, security: Security
) -> tuple[EmbedRow, list[list[float]]]:
    calls = [texts[i : i + texts_per_call] for i in range(0, len(texts), texts_per_call)]
    vectors: list[list[list[float]]] = [[] for _ in calls]
    latencies: list[float] = []
    limit = asyncio.Semaphore(concurrency)
    async with AsyncConveyorClient(address, security=security) as client:
        await asyncio.gather(*(client.embed(call, truncate=True) for call in calls[:_WARMUP_CALLS]))

        async def one(index: int) -> None:
            async with limit:
                sent = time.perf_counter()
                response = await client.embed(calls[index], truncate=True)
                latencies.append(time.perf_counter() - sent)
                vectors[index] = vectors_of(response)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(calls))))
        seconds = time.perf_counter() - started
    name = f"conveyor, concurrency {concurrency}, {texts_per_call} text(s) per call"
    return EmbedRow(name, len(texts), seconds, latencies), [v for call in vectors for v in call]


def run_transformers_loop(model_dir: Path, texts: list[str]) -> tuple[EmbedRow, list[list[float]]]:
    """Hugging Face's tokenizer and model, one text per forward, pooled as the checkpoint says."""
    from transformers import AutoModel, AutoTokenizer

    pooling = PoolingConfig.of(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def encode(text: str) -> list[float]:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=pooling.max_length)
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state[0]
        if pooling.mode == "cls":
            vector = hidden[0]
        elif pooling.mode == "max":
            vector = hidden.max(dim=0).values
        else:
            vector = hidden.mean(dim=0)
        if pooling.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return [float(x) for x in vector]

    for text in texts[:_WARMUP_CALLS]:
        encode(text)
    latencies, vectors = [], []
    started = time.perf_counter()
    for text in texts:
        sent = time.perf_counter()
        vectors.append(encode(text))
        latencies.append(time.perf_counter() - sent)
    seconds = time.perf_counter() - started
    return EmbedRow("transformers, one text at a time", len(texts), seconds, latencies), vectors


@contextmanager
def private_stack(model_dir: Path) -> Iterator[str]:
    """`conveyor serve` with the embedder as its only model; its address once a worker serves it."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client",
            "serve",
            "--model",
            str(model_dir),
            "--no-embedder",
            "--port",
            str(port),
        ],
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_until_serving(address, process)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_until_serving(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"conveyor serve exited with {process.returncode}")
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"no worker served {address} within {_START_TIMEOUT_S} s")


def _min_cosine(ours: list[list[float]], theirs: list[list[float]]) -> float:
    left, right = torch.tensor(ours), torch.tensor(theirs)
    return float(torch.nn.functional.cosine_similarity(left, right, dim=1).min())


def format_table(rows: list[EmbedRow]) -> str:
    lines = [f"{'':48}{'embeddings/s':>14}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"]
    for row in rows:
        latency = percentiles(row.latencies_s)
        lines.append(
            f"{row.name:48}{row.embeddings_per_s:>14.1f}"
            + "".join(f"{1000 * latency[p]:>10.1f}" for p in ("p50", "p90", "p99"))
        )
    return "\n".join(lines)


def run_embed_bench(args: argparse.Namespace) -> int:
    texts = embedding_texts(args.workload, args.num_texts)
    security = Security(args.api_key, args.tls_ca, args.tls_cert, args.tls_key)

    def load(address: str) -> tuple[EmbedRow, list[list[float]]]:
        return asyncio.run(run_load(address, texts, args.concurrency, args.texts_per_call, security))

    if args.address:
        ours, vectors = load(args.address)
    else:
        with private_stack(args.embedding_model) as address:
            ours, vectors = load(address)
    rows = [ours]
    agreement = None
    if args.baseline_requests != 0:
        count = args.baseline_requests or len(texts)
        baseline, reference = run_transformers_loop(args.embedding_model, texts[:count])
        rows.append(baseline)
        agreement = _min_cosine(vectors[:count], reference)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"texts: {len(texts)} from {args.workload.name} (messages and first lines), cut at the limit")
    print(format_table(rows))
    if agreement is not None:
        print(f"agreement: smallest cosine between our vectors and transformers' = {agreement:.6f}")
        print(f"speed-up over one at a time: {ours.embeddings_per_s / rows[1].embeddings_per_s:.1f}x")
    if args.json:
        report = {"rows": [row.figures() for row in rows], "min_cosine": agreement}
        args.json.write_text(json.dumps(report, indent=1))
    return 0
